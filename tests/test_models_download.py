"""Downloads against a local HTTP server on 127.0.0.1 (never the internet): resume, hashes, offline."""
from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from medxfer.models import MODELS, WeightsUnavailableError, build_trunk, is_cached, load_model, register_model
from medxfer.models.download import ExpectedHash, download
from medxfer.models.errors import DownloadError, HashMismatchError
from medxfer.models.fetch import fetch


class Server:
    """Serves ``files`` (name -> bytes), honours Range unless told not to, can cut a response short."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.support_range = True
        self.cut_after: int | None = None  # bytes to send before closing the connection
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                outer.requests.append((name, rng))
                if name not in outer.files:
                    self.send_error(404)
                    return
                data = outer.files[name]
                start = 0
                if rng and outer.support_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut_after is not None:
                    body = body[: outer.cut_after]
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


PAYLOAD = bytes(range(256)) * 4000  # ~1 MB


def test_download_verifies_and_is_atomic(server: Server, tmp_path: Path) -> None:
    server.files["a.bin"] = PAYLOAD
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    dest = tmp_path / "a.bin"
    assert download(server.url + "a.bin", dest, ExpectedHash(sha256=sha), progress=False) == sha
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "a.bin.part").exists()


def test_download_resumes_with_range(server: Server, tmp_path: Path) -> None:
    server.files["a.bin"] = PAYLOAD
    dest = tmp_path / "a.bin"
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD[:300_000])  # a killed earlier run
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    download(server.url + "a.bin", dest, ExpectedHash(prefix=md5[:8], algo="md5"), progress=False)
    assert server.requests == [("a.bin", "bytes=300000-")]
    assert dest.read_bytes() == PAYLOAD


def test_download_restarts_when_range_is_ignored(server: Server, tmp_path: Path) -> None:
    server.files["a.bin"] = PAYLOAD
    server.support_range = False
    (tmp_path / "a.bin.part").write_bytes(b"stale bytes from another file")
    download(server.url + "a.bin", tmp_path / "a.bin", ExpectedHash(sha256=hashlib.sha256(PAYLOAD).hexdigest()),
             progress=False)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD


def test_interrupted_download_then_resume(server: Server, tmp_path: Path) -> None:
    server.files["a.bin"] = PAYLOAD
    server.cut_after = 100_000
    dest = tmp_path / "a.bin"
    with pytest.raises(DownloadError, match="run the command again to resume"):
        download(server.url + "a.bin", dest, progress=False)
    assert not dest.exists() and (tmp_path / "a.bin.part").stat().st_size == 100_000
    server.cut_after = None
    download(server.url + "a.bin", dest, progress=False)
    assert server.requests[-1] == ("a.bin", "bytes=100000-")
    assert dest.read_bytes() == PAYLOAD


def test_hash_mismatch_deletes_the_file(server: Server, tmp_path: Path) -> None:
    server.files["a.bin"] = PAYLOAD
    dest = tmp_path / "a.bin"
    with pytest.raises(HashMismatchError, match="expected a digest starting with deadbeef"):
        download(server.url + "a.bin", dest, ExpectedHash(prefix="deadbeef"), progress=False)
    assert not dest.exists() and not (tmp_path / "a.bin.part").exists()


def test_file_url_and_bad_scheme(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    download(src.as_uri(), tmp_path / "out.bin", progress=False)
    assert (tmp_path / "out.bin").read_bytes() == PAYLOAD
    with pytest.raises(DownloadError, match="scheme 'ftp'"):
        download("ftp://example.org/x", tmp_path / "x", progress=False)


@pytest.fixture
def served_r18(server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[str, dict]]:
    """A temporary zoo entry whose URL points at the local server, with a correct sha256."""
    sd = build_trunk("resnet18", seed=4).state_dict()
    path = tmp_path / "orig.pth"
    torch.save({**sd, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, path)
    data = path.read_bytes()
    server.files["resnet18-test.pth"] = data
    spec = dataclasses.replace(MODELS.get("supervised-r18"), name="served-r18", aliases=(),
                               urls=(server.url + "resnet18-test.pth",), filename="resnet18-test.pth",
                               hash_prefix=None, sha256=hashlib.sha256(data).hexdigest())
    register_model(spec)
    monkeypatch.delenv("MEDXFER_OFFLINE", raising=False)
    yield "served-r18", sd
    MODELS.unregister("served-r18")


def test_fetch_downloads_once_then_works_offline(server: Server, served_r18: tuple[str, dict],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    name, sd = served_r18
    m = load_model(name)  # downloads, verifies, converts
    assert len(server.requests) == 1 and is_cached(MODELS.get(name))
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    monkeypatch.setenv("MEDXFER_OFFLINE", "1")
    server.files.clear()
    load_model(name)
    assert len(server.requests) == 1  # no network on the second load


def test_offline_error_names_file_url_and_fixes(server: Server, served_r18: tuple[str, dict],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    name, _ = served_r18
    monkeypatch.setenv("MEDXFER_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as info:
        load_model(name)
    msg = str(info.value)
    for part in ("resnet18-test.pth", server.url + "resnet18-test.pth", f"medxfer fetch {name} --from",
                 "--weights random", "MEDXFER_OFFLINE"):
        assert part in msg
    assert server.requests == []


def test_unreachable_server_is_weights_unavailable(served_r18: tuple[str, dict], server: Server) -> None:
    name, _ = served_r18
    server.close()
    with pytest.raises(WeightsUnavailableError, match="download failed"):
        fetch(name)


def test_corrupted_download_is_not_converted(server: Server, served_r18: tuple[str, dict]) -> None:
    name, _ = served_r18
    server.files["resnet18-test.pth"] = b"x" * 1000
    with pytest.raises(HashMismatchError):
        fetch(name)
    assert not is_cached(MODELS.get(name))


def test_manual_only_models_explain_how_to_get_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDXFER_OFFLINE", raising=False)
    for name, hint in (("simclr-v1", "simclr-converter"), ("pirl", "PyContrast")):
        with pytest.raises(WeightsUnavailableError, match=hint) as info:
            fetch(name)
        assert f"medxfer fetch {name} --from" in str(info.value)


def test_bad_cached_download_is_moved_aside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medxfer.cache import resolve_cache_dir
    from medxfer.models.errors import CheckpointError

    monkeypatch.setenv("MEDXFER_OFFLINE", "1")
    spec = MODELS.get("dinov2-vits14")  # no published hash: only conversion can notice
    downloads = resolve_cache_dir(None) / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    full = tmp_path / "full.pth"
    torch.save(build_trunk("dinov2_vits14").state_dict(), full)
    (downloads / spec.filename).write_bytes(full.read_bytes()[:100_000])  # an old, cut download
    with pytest.raises(CheckpointError, match="moved to .*corrupt.*run the command again"):
        fetch(spec.name)
    assert not (downloads / spec.filename).exists() and (downloads / (spec.filename + ".corrupt")).exists()
    with pytest.raises(WeightsUnavailableError):  # next time: a fresh download is needed (offline here)
        fetch(spec.name)
