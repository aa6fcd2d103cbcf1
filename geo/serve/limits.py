"""The serving limits: tuned data with documented defaults, read from ``geo serve --config FILE``.

They are not command-line options because they are changed rarely and together (a bigger machine, a
GPU, slow clients), and a file keeps them reviewable next to the deployment. The file is JSON
(``.json``) or TOML (``.toml``) holding any of the keys below at the top level; a key not listed is an
error naming the file and the key, so a typo never silently leaves a default in place.

=================  ===========  ==========================================================================
key                default      what it bounds, and when to change it
=================  ===========  ==========================================================================
max_batch          16           images in one forward pass; raise it on a GPU, lower it to cut p99 latency
max_wait_ms        5            how long a batch waits for company while requests are still arriving
queue_size         64           images (and embedding vectors) waiting for the model; beyond: 503
max_images         16           images in one request (413); at most ``queue_size``
max_upload_mb      20           one image file (413)
max_pixels         64000000     one image's pixels, read from its header before decoding (422: bombs)
timeout_s          60           a request still unanswered after this gets 504
io_threads         2            threads reading gallery photos for thumbnails
read_timeout_s     30           a client must send a request's headers, and then its body, within this
                                (408, connection closed); raise it for large uploads over slow links
max_inflight_mb    256          request bodies held at once across all clients (503 with Retry-After
                                beyond it): the server's memory bound; a larger request is served alone
model_threads      0            batches run side by side, each on one core; 0: one per CPU core on a
                                CPU, 1 on a GPU. 1 on a CPU gives each batch every core: a lone client's
                                answer comes sooner, a loaded server answers ~25 % fewer photos a second
=================  ===========  ==========================================================================
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from geo.core.settings_file import read_settings_file, unknown_setting

MB = 1 << 20
MULTIPART_FRAMING = 1 << 20  # the form's boundaries and headers around its files


class LimitsError(ValueError):
    """A limits file that cannot be used: unreadable, an unknown key, a value of the wrong type or range."""


@dataclass(frozen=True)
class ServeLimits:
    """What ``geo serve`` accepts and holds; the module docstring documents each field."""

    max_batch: int = 16
    max_wait_ms: float = 5.0
    queue_size: int = 64
    max_images: int = 16
    max_upload_mb: float = 20.0
    max_pixels: int = 64_000_000
    timeout_s: float = 60.0
    io_threads: int = 2
    read_timeout_s: float = 30.0
    max_inflight_mb: float = 256.0
    model_threads: int = 0

    def __post_init__(self) -> None:
        if self.max_images > self.queue_size:
            raise LimitsError(f"max_images ({self.max_images}) cannot exceed queue_size ({self.queue_size}): "
                              "such a request could never be queued")
        if min(self.max_images, self.queue_size, self.max_batch, self.io_threads, self.max_pixels) < 1 \
                or min(self.max_upload_mb, self.timeout_s, self.read_timeout_s, self.max_inflight_mb) <= 0 \
                or self.max_wait_ms < 0 or self.model_threads < 0:
            raise LimitsError(f"serve limits must be positive: {asdict(self)}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    @property
    def max_form_bytes(self) -> int:
        """The largest multipart body: every image at its limit, plus the framing."""
        return self.max_images * self.max_upload_bytes + MULTIPART_FRAMING

    def max_json_bytes(self, dim: int) -> int:
        """The largest JSON body: ``queue_size`` vectors of ``dim`` numbers at up to 32 characters each, plus ids.

        Enforced before the body is parsed, so parsing (at most ~16 bytes of Python objects per byte) stays bounded.
        """
        return self.queue_size * dim * 32 + (64 << 10)

    @property
    def max_inflight_bytes(self) -> int:
        return int(self.max_inflight_mb * MB)


def load_limits(path: Path) -> ServeLimits:
    """The limits in a JSON or TOML file, defaults for the keys it leaves out; LimitsError names the file and key."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise LimitsError(f"{path}: a limits file is .json or .toml, not {suffix or 'without a suffix'!r}")
    data = read_settings_file(path, LimitsError)
    values = {key: _value(path, key, value) for key, value in data.items()}
    try:
        return ServeLimits(**values)
    except LimitsError as e:
        raise LimitsError(f"{path}: {e}") from None


def _value(path: Path, key: str, value: Any) -> int | float:
    types = {f.name: f.type for f in fields(ServeLimits)}
    if key not in types:
        raise LimitsError(unknown_setting(path, key, list(types)))
    wants_int = types[key] == "int"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (wants_int and not isinstance(value, int)):
        raise LimitsError(f"{path}: {key} must be {'an integer' if wants_int else 'a number'}, not {value!r}")
    return value
