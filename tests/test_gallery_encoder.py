"""The location encoder reproduces GeoCLIP's, and its modules round-trip through safetensors."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from geo.core.geodesy import equal_earth
from geo.models.location import (
    ImageProjection,
    LocationEncoder,
    equal_earth_torch,
    geoclip_gallery_csv,
    load_module,
    save_module,
)


def test_matches_geoclip_reference_on_gallery_points():
    # Importing only the location-encoder module never touches the hub (GeoCLIP() would fetch CLIP).
    from geoclip.model.location_encoder import LocationEncoder as RefEncoder

    pts = pd.read_csv(geoclip_gallery_csv())[["LAT", "LON"]].to_numpy(np.float32)
    pts = pts[np.random.default_rng(0).choice(len(pts), 1200, replace=False)]
    ref = RefEncoder().eval()  # loads the shipped location_encoder_weights.pth
    with torch.no_grad():
        expected = ref(torch.from_numpy(pts)).numpy()
    ours = LocationEncoder.from_geoclip().encode(pts)
    assert ours.shape == (1200, 512)
    assert np.abs(ours - expected).max() <= 1e-4


def test_equal_earth_twin_matches_geodesy():
    rng = np.random.default_rng(1)
    ll = np.stack([rng.uniform(-90, 90, 500), rng.uniform(-180, 180, 500)], 1)
    got = equal_earth_torch(torch.from_numpy(ll)).numpy()
    np.testing.assert_allclose(got, equal_earth(ll[:, 0], ll[:, 1]), atol=1e-9)


def test_image_mlp_and_logit_scale_from_geoclip():
    sd = torch.load(geoclip_gallery_csv().parents[1] / "weights" / "image_encoder_mlp_weights.pth", weights_only=True)
    proj = ImageProjection.from_geoclip()
    x = np.random.default_rng(2).standard_normal((4, 768)).astype(np.float32)
    ref = torch.relu(torch.from_numpy(x) @ sd["0.weight"].T + sd["0.bias"]) @ sd["2.weight"].T + sd["2.bias"]
    np.testing.assert_allclose(proj.encode(x), ref.numpy(), atol=1e-5)
    assert abs(proj.logit_scale.exp().item() - 39.7) < 0.1


def test_extra_sigma_starts_as_geoclip():
    pts = np.array([[48.85, 2.35], [-33.9, 151.2]], np.float32)
    base = LocationEncoder.from_geoclip().encode(pts)
    fine = LocationEncoder.from_geoclip(extra_sigmas=[2.0**12])
    assert fine.sigmas[-1] == 4096.0
    np.testing.assert_allclose(fine.encode(pts), base, atol=1e-6)


@pytest.mark.parametrize("module", [
    LocationEncoder(sigmas=[1.0, 8.0], n_freq=8, hidden=16, depth=2, out_dim=8, seed=3),
    ImageProjection(in_dim=8, out_dim=8, hidden=16, residual=True, logit_scale=2.0),
])
def test_safetensors_round_trip(tmp_path, module):
    save_module(tmp_path / "m.safetensors", module)
    back = load_module(tmp_path / "m.safetensors")
    x = np.array([[10.0, 20.0], [-5.0, 100.0]], np.float32) if isinstance(module, LocationEncoder) else \
        np.ones((2, 8), np.float32)
    np.testing.assert_array_equal(back.encode(x), module.encode(x))
    assert back.config() == module.config()


def test_load_module_names_file_and_reason(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_module(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("residual", [False, True])
def test_projection_encode_is_the_eval_forward(residual):
    """encode runs the MLP in numpy (a query's hot path): the same features as torch's eval-mode forward, for
    one row (one BLAS thread) and for many in several batches, dropout off and a zero row kept at zero."""
    torch.manual_seed(0)
    proj = ImageProjection(in_dim=32, out_dim=32 if residual else 16, hidden=48, dropout=0.3, residual=residual)
    if residual:  # a trained residual layer, not the identity it starts as
        torch.nn.init.normal_(proj.mlp[-1].weight, std=0.1)
    proj.train()  # encode must not depend on the module's mode
    x = np.random.default_rng(1).standard_normal((200, 32)).astype(np.float32)
    x[7] = 0.0
    with torch.no_grad():
        ref = proj.eval()(torch.from_numpy(x))
    proj.train()
    for rows, batch in ((slice(0, 1), 65536), (slice(None), 64)):
        got = proj.encode(x[rows], batch=batch, normalize=True)
        want = torch.nn.functional.normalize(ref[rows], dim=1).numpy()
        np.testing.assert_allclose(got, want, atol=1e-6)
        np.testing.assert_allclose(proj.encode(x[rows], batch=batch), ref[rows].numpy(), rtol=1e-5, atol=1e-6)
    assert np.isfinite(proj.encode(np.zeros((1, 32), np.float32), normalize=True)).all()
    assert proj.encode(np.zeros((0, 32), np.float32)).shape == (0, proj.out_dim)


def blas_thread_counts() -> set[int]:
    from threadpoolctl import threadpool_info

    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


def test_one_row_runs_on_one_blas_thread_and_overlapping_blocks_restore_it_last():
    from geo.core.runtime import NUMPY_ROWS, one_row_threads

    before = blas_thread_counts()
    outer = one_row_threads(NUMPY_ROWS)
    outer.__enter__()
    with one_row_threads(NUMPY_ROWS):  # another thread's block, overlapping the first
        assert blas_thread_counts() == {1}
    assert blas_thread_counts() == {1}  # the first block still holds it
    outer.__exit__(None, None, None)
    assert blas_thread_counts() == before
    with one_row_threads(NUMPY_ROWS + 1):
        assert blas_thread_counts() == before


def test_one_row_blocks_hold_blas_to_one_thread_from_any_thread():
    """A server answers on several model threads. threadpoolctl lets one thread own an OpenBLAS's setting and
    ignores the others'; a one-row block must still hold BLAS to one thread on a thread that does not own it."""
    import threading

    from threadpoolctl import threadpool_limits

    from geo.core.runtime import NUMPY_ROWS, one_row_threads

    seen = []

    def answer() -> None:
        with one_row_threads(NUMPY_ROWS):
            seen.append(blas_thread_counts())

    with threadpool_limits(2, user_api="blas"):  # this thread sets first, so threadpoolctl gives it the setting
        worker = threading.Thread(target=answer)
        worker.start()
        worker.join()
        assert seen == [{1}]
        assert blas_thread_counts() == {2}  # and it is restored after the worker's block


def test_one_row_runs_faiss_on_one_openmp_thread_of_its_own():
    """FAISS's OpenMP team is one thread within a one-row block, for the calling thread only (a server's other
    model threads keep theirs), and comes back after it; more rows keep the team."""
    import threading

    import faiss

    from geo.core.runtime import NUMPY_ROWS, one_row_threads

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(3)  # a team larger than one on any machine, so the test can fail
    try:
        with one_row_threads(NUMPY_ROWS + 1):
            assert faiss.omp_get_max_threads() == 3
        seen = []
        with one_row_threads(NUMPY_ROWS):
            assert faiss.omp_get_max_threads() == 1
            other = threading.Thread(target=lambda: seen.append(faiss.omp_get_max_threads()))
            other.start()
            other.join()
        assert seen and seen[0] != 1
        assert faiss.omp_get_max_threads() == 3
    finally:
        faiss.omp_set_num_threads(before)