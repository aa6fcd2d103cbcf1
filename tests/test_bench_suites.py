"""Suite readers on the real published metadata formats."""
from __future__ import annotations

import pytest

from geo.eval.suites import SUITES, SuiteError, get_suite, read_custom, shared_data_dir

DATA = shared_data_dir()
REAL = [
    ("im2gps", "geoestimation/meta/im2gps_places365.csv", 237, True),
    ("im2gps3k", "geoestimation/meta/im2gps3k_places365.csv", 2997, True),
    ("yfcc4k", "yfcc/yfcc4k_places365_G3.csv", 4536, False),
    ("yfcc26k", "yfcc/yfcc25600_places365.csv", 25600, True),
    ("osv5m", "osv5m-sample/osv5m_sample.csv", 71, False),
]


@pytest.mark.parametrize("name,rel,rows,has_scene", REAL, ids=[r[0] for r in REAL])
def test_reads_the_published_format(name, rel, rows, has_scene):
    if not (DATA / rel).is_file():
        pytest.skip(f"{DATA / rel} not available")
    df = get_suite(name).reader(DATA / rel)
    assert len(df) == rows and df["query_id"].is_unique
    assert df["true_lat"].between(-90, 90).all() and df["true_lon"].between(-180, 180).all()
    assert df["scene"].notna().all() == has_scene
    if name == "yfcc4k":  # the unnamed-column file: LON comes before LAT
        first = df.iloc[0]
        assert (first["query_id"], first["true_lat"], first["true_lon"]) == ("10201275523.jpg", 43.649708, -79.365637)
    if name == "osv5m":
        assert df["rel_path"].iloc[0] == df["query_id"].iloc[0] + ".jpg" and df["country"].notna().all()


def test_meta_beside_the_images_wins(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "im2gps3k_places365.csv").write_text("IMG_ID,LAT,LON\na.jpg,1,2\n")
    assert get_suite("im2gps3k").find_meta(tmp_path / "images") == tmp_path / "im2gps3k_places365.csv"


def test_custom_manifest_detects_columns_and_rejects_bad_rows(tmp_path):
    ok = tmp_path / "m.csv"
    ok.write_text("path,latitude,longitude\nx/a.jpg,1.5,2.5\n")
    assert read_custom(ok)[["rel_path", "true_lat"]].iloc[0].tolist() == ["x/a.jpg", 1.5]
    bad = tmp_path / "bad.csv"
    bad.write_text("IMG_ID,LAT,LON\na.jpg,1,2\nb.jpg,,2\nc.jpg,1,east\n")
    with pytest.raises(SuiteError, match=r"bad.csv: .*line 3 \(b.jpg\), line 4 \(c.jpg\)"):
        read_custom(bad)
    with pytest.raises(SuiteError, match="cannot find an image and coordinates"):
        (tmp_path / "n.csv").write_text("foo,bar\n1,2\n")
        read_custom(tmp_path / "n.csv")


def test_registry_names_are_the_cli_commands():
    assert list(SUITES) == ["im2gps", "im2gps3k", "yfcc4k", "yfcc26k", "osv5m", "custom"]
    with pytest.raises(SuiteError, match="unknown suite"):
        get_suite("mp16")
