from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geo.data.manifest import ManifestError, exif_latlon, read_manifest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared reference data not present")


def _write(tmp_path, name: str, df: pd.DataFrame) -> Path:
    p = tmp_path / name
    df.to_parquet(p) if name.endswith(".parquet") else df.to_csv(p, index=False)
    return p


def test_csv_with_path_column_keeps_extras_and_resolves_against_root(tmp_path):
    src = _write(tmp_path, "m.csv", pd.DataFrame({
        "Path": ["a.jpg", "/abs/b.jpg"], "Latitude": [1.5, -2.0], "LNG": [3.0, 179.9], "AUTHOR": ["x", "y"]}))
    r = read_manifest(src, image_root=tmp_path / "imgs")
    assert list(r.df.columns) == ["id", "path", "lat", "lon", "AUTHOR"] and r.errors == []
    assert r.df.path.tolist() == [str(tmp_path / "imgs" / "a.jpg"), "/abs/b.jpg"]
    assert r.df.id.tolist() == ["a.jpg", "/abs/b.jpg"]
    assert r.df.lat.dtype == np.float64 and r.df.lon.tolist() == [3.0, 179.9]
    assert read_manifest(src).df.path.iloc[0] == str(tmp_path / "a.jpg")  # default root: the manifest's folder


def test_parquet_with_id_and_image_columns(tmp_path):
    src = _write(tmp_path, "m.parquet", pd.DataFrame({
        "id": [10, 11], "image": ["p/1.png", "p/2.png"], "lat": [0.0, 1.0], "lon": [0.0, 1.0], "S3_Label": [1, 2]}))
    r = read_manifest(src)
    assert r.df.id.tolist() == ["10", "11"] and r.df.path.iloc[1] == str(tmp_path / "p" / "2.png")
    assert r.df.S3_Label.tolist() == [1, 2] and r.source == str(src)


def test_id_only_tries_jpg_extension_and_keeps_long_ids_exact(tmp_path):
    (tmp_path / "546314506564628.jpg").write_bytes(b"x")
    (tmp_path / "plain").write_bytes(b"x")
    (tmp_path / "m.csv").write_text(",id,latitude,longitude\n0,546314506564628,1,2\n1,plain,3,4\n")
    r = read_manifest(tmp_path / "m.csv")
    assert "Unnamed: 0" not in r.df.columns
    assert r.df.id.tolist() == ["546314506564628", "plain"]
    assert r.df.path.tolist() == [str(tmp_path / "546314506564628.jpg"), str(tmp_path / "plain")]


def test_bad_rows_become_error_rows(tmp_path):
    src = _write(tmp_path, "m.csv", pd.DataFrame({
        "IMG_ID": ["a.jpg", "b.jpg", "c.jpg", "a.jpg", None, "e.jpg", "f.jpg"],
        "LAT": [1.0, 91.0, "north", 2.0, 3.0, float("inf"), 4.0],
        "LON": [1.0, 0.0, 0.0, 2.0, 3.0, 0.0, -181.0]}))
    r = read_manifest(src)
    assert r.df.id.tolist() == ["a.jpg"]
    reasons = [e["reason"] for e in r.errors]
    assert reasons[0] == "row 2: latitude 91.0 out of range [-90, 90]"
    assert reasons[1].startswith("row 3: latitude 'north'")
    assert reasons[2] == "row 4: duplicate id 'a.jpg' (first at row 1)"
    assert reasons[3] == "row 5: no image id"
    assert reasons[4].startswith("row 6: latitude") and "finite" in reasons[4]
    assert reasons[5] == "row 7: longitude -181.0 out of range [-180, 180]"
    assert all(e["stage"] == "manifest" for e in r.errors) and r.errors[0]["path"] == str(tmp_path / "b.jpg")


def test_unusable_manifests_raise(tmp_path):
    src = _write(tmp_path, "m.csv", pd.DataFrame({"thing": ["a"], "LAT": [1.0], "x": [2.0]}))
    with pytest.raises(ManifestError, match=r"m\.csv: no image .*, longitude .*; it has \['thing', 'LAT', 'x'\]"):
        read_manifest(src)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ManifestError, match="empty.csv: empty manifest"):
        read_manifest(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("path,lat,lon\n")
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(tmp_path / "header.csv")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ManifestError, match="bad.parquet: cannot read as Parquet"):
        read_manifest(tmp_path / "bad.parquet")
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "gone.csv")


def _dms(value: float) -> tuple[Fraction, ...]:
    d = int(value)
    m = int((value - d) * 60)
    s = Fraction(round(((value - d) * 60 - m) * 60 * 1000), 1000)
    return (Fraction(d), Fraction(m), s)


def _gps_photo(textured, path: Path, lat: float, lon: float) -> None:
    from PIL import Image

    exif = Image.Exif()
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N" if lat >= 0 else "S", 2: _dms(abs(lat)), 3: "E" if lon >= 0 else "W", 4: _dms(abs(lon))})
    path.parent.mkdir(parents=True, exist_ok=True)
    textured(64, 48).save(path, exif=exif)


def test_folder_of_exif_gps_photos(tmp_path, textured):
    _gps_photo(textured, tmp_path / "trip" / "rio.jpg", -22.9519, -43.2105)
    _gps_photo(textured, tmp_path / "oslo.jpg", 59.9139, 10.7522)
    textured(32, 32).save(tmp_path / "nogps.jpg")
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")
    (tmp_path / "broken.png").write_text("not a png")
    r = read_manifest(tmp_path)
    assert r.df.id.tolist() == ["oslo.jpg", "trip/rio.jpg"]
    assert r.df.lat.tolist() == pytest.approx([59.9139, -22.9519], abs=1e-5)
    assert r.df.lon.tolist() == pytest.approx([10.7522, -43.2105], abs=1e-5)
    assert {Path(e["path"]).name: e["reason"] for e in r.errors} == {
        "nogps.jpg": "no GPS in EXIF", "broken.png": "not an image (unrecognised format)"}
    assert exif_latlon(tmp_path / "trip" / "rio.jpg")[0] < 0
    (tmp_path / "sub").mkdir()
    with pytest.raises(ManifestError, match="no image files"):
        read_manifest(tmp_path / "sub")


@needs_data
def test_real_im2gps3k_csv():
    r = read_manifest(DATA / "im2gps3k-dev" / "im2gps3k_places365.csv", DATA / "im2gps3k-dev" / "images")
    assert len(r.df) == 671 and r.errors == []
    assert list(r.df.columns[:5]) == ["id", "path", "lat", "lon", "AUTHOR"] and "S365_Label" in r.df.columns
    assert all(Path(p).is_file() for p in r.df.path)


@needs_data
def test_real_osv5m_csv():
    r = read_manifest(DATA / "osv5m-sample" / "osv5m_sample.csv", DATA / "osv5m-sample" / "images")
    assert len(r.df) == 71 and r.errors == [] and not any(c.startswith("Unnamed") for c in r.df.columns)
    row = r.df.iloc[0]
    assert row.id == "546314506564628" and row.lat == pytest.approx(39.55910238557) and row.country == "IT"
    assert all(Path(p).is_file() for p in r.df.path)


@needs_data
def test_real_yfcc_csvs():
    r4k = read_manifest(DATA / "yfcc" / "yfcc4k_places365_G3.csv")
    assert len(r4k.df) + len(r4k.errors) == 4536 and r4k.df.id.is_unique
    assert r4k.df.iloc[0][["id", "lat", "lon"]].tolist() == ["10201275523.jpg", 43.649708, -79.365637]
    r26k = read_manifest(DATA / "yfcc" / "yfcc25600_places365.csv")
    assert len(r26k.df) + len(r26k.errors) == 25600 and r26k.df.id.iloc[0] == "45/77/3228511372.jpg"


def _raw_gps_photo(textured, path: Path, gps_fields: dict) -> Path:
    from PIL import Image

    exif = Image.Exif()
    exif.get_ifd(0x8825).update(gps_fields)
    textured(64, 48).save(path, exif=exif)
    return path


def test_exif_gps_follows_the_spec(tmp_path, textured):
    from geo.data.manifest import _dms, _signed

    f = Fraction
    south = _raw_gps_photo(textured, tmp_path / "s.jpg", {1: "S", 2: (f(45), f(30), f(0)), 3: "W", 4: (f(1), f(0), f(36))})
    assert exif_latlon(south) == pytest.approx((-45.5, -1.01))
    # a negative degrees field negates the whole value: -45 30' is -45.5 (it was read as -44.5)
    assert _signed(_dms((-45.0, 30.0, 0.0)), "N", "NS", "GPSLatitudeRef") == -45.5
    assert _signed(_dms((-45.0, 30.0, 0.0)), "S", "NS", "GPSLatitudeRef") == -45.5  # never flipped back
    assert _signed(_dms(-12.25), None, "EW", "GPSLongitudeRef") == -12.25  # a negative bare number, no reference
    for fields, reason in (({1: "N", 2: (f(10), f(75), f(0)), 3: "E", 4: (f(1), f(0), f(0))}, "minutes 75"),
                           ({1: "N", 2: (f(10), f(0), f(60)), 3: "E", 4: (f(1), f(0), f(0))}, "seconds 60"),
                           ({1: "X", 2: (f(10), f(0), f(0)), 3: "E", 4: (f(1), f(0), f(0))}, "'X' is not N or S")):
        with pytest.raises(ValueError, match=reason):
            exif_latlon(_raw_gps_photo(textured, tmp_path / "bad.jpg", fields))


@pytest.mark.parametrize("text,problem", [
    ("path,lat,lon\na.jpg,true,2.0\nb.jpg,false,3.0\n", "'lat' holds true/false"),
    ("path,lat,latitude,lon\na.jpg,48.85,48.85,2.35\nb.jpg,10.0,-10.0,3.0\n",
     "'lat' and 'latitude' both give this coordinate and disagree at 1 rows"),
    ("path,lat,latitude,lon\na.jpg,48.85,48.85,2.35\nb.jpg,10.0,10.0,3.0\n", None),  # agreeing twins are fine
])
def test_coordinate_columns_must_be_degrees_and_agree(tmp_path, text, problem):
    (tmp_path / "m.csv").write_text(text)
    if problem is None:
        assert read_manifest(tmp_path / "m.csv").df["lat"].tolist() == [48.85, 10.0]
        return
    with pytest.raises(ManifestError, match=problem):
        read_manifest(tmp_path / "m.csv")
