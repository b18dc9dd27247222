"""The live viewer: images, rates, the page server, and the whole path Tiled → viewer → headless Chromium.

The browser tests drive Debian's ``chromium`` over the DevTools protocol (a websocket; no Playwright, no
browser download) against a real Tiled server written to by ``TiledPublisher``, exactly as the publish
stage writes.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import matplotlib
import numpy as np
import PIL.Image
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest, start_http_server
from tiled.client import from_uri
from tiled.server import SimpleTiledServer
from websockets.sync.client import ClientConnection, connect

from phasestream.apps.tiled_server import EmbeddedTiledServer, generate_api_key
from phasestream.apps.viewer.app import Viewer, ViewerHTTPServer, run_viewer
from phasestream.apps.viewer.follow import (
    STOPPED_WHILE_RECONNECTING,
    check_streaming,
    quiet_stopped_subscriptions,
    stream_url,
)
from phasestream.apps.viewer.images import (
    amplitude_image,
    phase_image,
    positions_px,
    probe_amplitude,
    real_image,
    render_png,
)
from phasestream.apps.viewer.metrics import Scrape, metrics_url, parse_counters, stage_rates
from phasestream.apps.viewer.state import ImageName, LinkState, LiveView, scan_summary
from phasestream.errors import ConfigError, PublishError
from phasestream.runtime.tiled.access import read_api_key
from phasestream.runtime.tiled.publisher import TiledPublisher

DATA = Path(__file__).parent / "data"
WAIT_S = 20.0  # bound for what takes milliseconds; never slept
CHROMIUM_INSTALL = "apt-get install -y --no-install-recommends chromium"


def decode_png(png: bytes) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB"))


# -- images: against NumPy references, and invariants ---------------------------------------------------


def test_amplitude_image_is_the_grey_level_of_the_modulus() -> None:
    rng = np.random.default_rng(0)
    values = (rng.random((40, 50)) * np.exp(2j * np.pi * rng.random((40, 50)))).astype(np.complex64)
    image = amplitude_image(values)
    grey = decode_png(image.png)
    # Reference: grey bin k of 256 holds [k/256, (k+1)/256) of 0 … the 99.9th percentile of |values|.
    top = np.percentile(np.abs(values), 99.9)
    expected = np.clip(np.floor(np.abs(values) / top * 256), 0, 255)
    assert image.shape_px == image.source_shape_px == (40, 50)
    assert np.array_equal(grey[..., 0], grey[..., 2])  # grey: R = G = B
    assert np.abs(grey[..., 0].astype(int) - expected).max() <= 1


def test_phase_image_shows_the_phase_only_and_wraps_without_an_edge() -> None:
    _y, x = np.mgrid[0:32, 0:64]
    ramp = np.exp(1j * (x / 64 * 2 * np.pi - np.pi + 1e-3))
    amplitude = 0.1 + np.random.default_rng(1).random((32, 64))
    shown = decode_png(phase_image(ramp).png).astype(int)
    # Invariant: the amplitude does not change what the phase looks like.
    assert np.array_equal(shown, decode_png(phase_image(amplitude * ramp).png).astype(int))
    # Reference: matplotlib's twilight at (φ + π) / 2π.
    reference = matplotlib.colormaps["twilight"]((np.angle(ramp) + np.pi) / (2 * np.pi), bytes=True)[..., :3]
    assert np.abs(shown - reference).max() <= 1
    # Cyclic: just above −π and just below π look alike; a quarter turn away does not.
    first, last, quarter = shown[0, 0], shown[0, -1], shown[0, 16]
    assert np.abs(first - last).max() <= 12 < np.abs(first - quarter).max()


def test_probe_modes_add_up_in_intensity() -> None:
    probe = np.load(DATA / "ptycho_sim_tike_setup.npz")["probe"]  # (1, 1, 2, 16, 16): two modes
    total = probe_amplitude(probe)
    modes = probe.reshape(2, 16, 16)
    assert total.shape == (16, 16)
    np.testing.assert_allclose(total**2, np.abs(modes[0]) ** 2 + np.abs(modes[1]) ** 2, rtol=1e-6)
    # Invariant: the power of all modes together is the power of the total.
    np.testing.assert_allclose((total**2).sum(), (np.abs(probe) ** 2).sum(), rtol=1e-6)


def test_large_arrays_are_subsampled_and_volumes_show_their_central_slice() -> None:
    big = amplitude_image(np.ones((3000, 2000), np.complex64))
    assert big.shape_px == (1000, 667) and big.source_shape_px == (3000, 2000)
    volume = np.zeros((5, 8, 8), np.float32)
    volume[2] = np.arange(64, dtype=np.float32).reshape(8, 8)
    assert np.ptp(decode_png(real_image(volume).png)) > 0  # slice 2 of 5, not an empty one


def test_colour_scale_clips_and_survives_flat_or_nan_images() -> None:
    ramp = np.linspace(-1.0, 2.0, 301)[None, :]
    grey = decode_png(render_png(ramp, "gray", 0.0, 1.0, (1, 301)).png)[0, :, 0]
    assert grey[0] == 0 and grey[-1] == 255 and grey[100] == 0 and grey[200] == 255
    assert np.all(np.diff(grey.astype(int)) >= 0)
    flat = decode_png(real_image(np.full((4, 4), np.nan)).png)
    assert flat.shape == (4, 4, 3)


def test_positions_land_where_the_solver_puts_the_probe_centres() -> None:
    from phasestream.models.physics import positions_to_pixels

    rng = np.random.default_rng(2)
    pixel_size_m, probe_shape, margin_px = 12e-9, (24, 24), 2
    positions_m = rng.uniform(0, 3e-6, (50, 2))
    origin_m = positions_m.min(axis=0)
    windows = positions_to_pixels(
        positions_m, pixel_size_m, probe_shape, margin_px=margin_px, origin_m=origin_m
    )
    # The refine stage publishes the position of object pixel (0, 0) as origin_m.
    published_origin_m = origin_m - (margin_px + np.array(probe_shape) // 2) * pixel_size_m
    centres = positions_px(positions_m, tuple(published_origin_m), pixel_size_m)
    expected = windows.top_left_px + windows.subpixel_px + np.array(probe_shape) // 2
    np.testing.assert_allclose(centres, expected, atol=1e-9)
    with pytest.raises(ConfigError, match=r"\(n, 2\)"):
        positions_px(np.zeros(4), (0.0, 0.0), 1e-8)


# -- rates from /metrics ---------------------------------------------------------------------------------


def _exposition(received: dict[tuple[str, str], float]) -> str:
    registry = CollectorRegistry()
    counter = Counter("phasestream_frames_received", "frames", ["stage", "worker"], registry=registry)
    for (stage, worker), value in received.items():
        counter.labels(stage=stage, worker=worker).inc(value)
    return generate_latest(registry).decode()


def test_stage_rates_sum_workers_and_survive_a_restart() -> None:
    url = "http://127.0.0.1:1/metrics"
    before = Scrape(10.0, parse_counters(url, _exposition({("ingest", "0"): 100, ("binning", "0"): 40})), {})
    after = Scrape(
        12.0,
        parse_counters(
            url,
            _exposition({("ingest", "0"): 300, ("binning", "0"): 10, ("binning", "1"): 5}),
        ),
        {},
    )
    rows = {row["stage"]: row for row in stage_rates(before, after)}
    assert rows["ingest"]["frames_in_per_s"] == pytest.approx(100.0)
    # binning.0 restarted (40 → 10): its 10 count; binning.1 is new: no rate until the next scrape.
    assert rows["binning"]["frames_in_per_s"] == pytest.approx(5.0)
    assert list(rows) == ["ingest", "binning"]


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("9101", "http://127.0.0.1:9101/metrics"),
        ("127.0.0.1:9101", "http://127.0.0.1:9101/metrics"),
        ("http://host:9101", "http://host:9101/metrics"),
        ("http://host:9101/other", "http://host:9101/other"),
    ],
)
def test_metrics_url_forms(given: str, url: str) -> None:
    assert metrics_url(given) == url


# -- state, keys and the page server ---------------------------------------------------------------------


def test_scan_summary_reads_the_publisher_metadata() -> None:
    metadata = {
        "status": "running",
        "iteration": 40,
        "quality": {"r_factor": 0.125, "fourier_error": float("nan")},
        "planned_frames": 420,
        "geometry": {"energy_kev": 8.0},
    }
    summary = scan_summary("uid-1", metadata)
    assert summary["uid"] == "uid-1" and summary["iteration"] == 40 and summary["r_factor"] == 0.125
    assert summary["fourier_error"] is None  # NaN is not JSON
    assert summary["algorithm"] is None and "geometry" not in summary


def test_api_key_comes_from_a_file_or_the_environment(tmp_path: Path, monkeypatch) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("fromfile\n")
    key_file.chmod(0o600)
    monkeypatch.setenv("PHASESTREAM_TILED__API_KEY", "fromenv")
    assert read_api_key(key_file) == "fromfile"
    assert read_api_key(None) == "fromenv"
    with pytest.raises(ConfigError, match="cannot read the Tiled API key file"):
        read_api_key(tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "empty").chmod(0o600)
    with pytest.raises(ConfigError, match="is empty"):
        read_api_key(tmp_path / "empty")


def test_view_needs_a_valid_tiled_uri(monkeypatch) -> None:
    monkeypatch.delenv("PHASESTREAM_TILED__URI", raising=False)
    with pytest.raises(ConfigError, match="needs --tiled-uri"):
        run_viewer(tiled_uri=None)
    with pytest.raises(ConfigError, match="not a valid URI"):
        Viewer("http://host:port", None)
    with pytest.raises(ConfigError, match="--metrics 'ftp://host/metrics' is not an http URL"):
        Viewer("http://127.0.0.1:8000", None, metrics_urls=["ftp://host/metrics"])


@pytest.fixture
def page_server() -> Iterator[tuple[LiveView, str]]:
    view = LiveView("http://tiled.example:8000")
    server = ViewerHTTPServer(view)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield view, server.url
    view.close()
    server.shutdown()
    server.server_close()


def _events(response: httpx.Response) -> Iterator[dict]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield json.loads(line[6:])


def test_page_server_streams_changes_and_serves_images(page_server: tuple[LiveView, str]) -> None:
    view, url = page_server
    page = httpx.get(url)
    assert page.status_code == 200 and 'id="iteration"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(f"{url}viewer.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{url}image/amplitude.png").status_code == 404  # nothing published yet
    assert httpx.get(f"{url}image/../index.html").status_code == 404
    with httpx.stream("GET", f"{url}events", timeout=WAIT_S) as response:
        assert response.headers["content-type"] == "text/event-stream"
        events = _events(response)
        first = next(events)
        assert first["scan"] is None and first["link"]["state"] == LinkState.CONNECTING
        view.start_scan("uid-7")
        view.set_scan_metadata("uid-7", {"iteration": 3})
        view.set_image(ImageName.AMPLITUDE, amplitude_image(np.ones((8, 8))))
        while (state := next(events))["images"].get("amplitude") is None:
            pass
    assert state["scan"]["uid"] == "uid-7" and state["scan"]["iteration"] == 3
    assert state["images"]["amplitude"]["shape_px"] == [8, 8]
    png = httpx.get(f"{url}image/amplitude.png?v={state['images']['amplitude']['version']}")
    assert png.headers["content-type"] == "image/png" and decode_png(png.content).shape == (8, 8, 3)


def test_page_server_answers_only_loopback_names(page_server: tuple[LiveView, str]) -> None:
    _view, url = page_server
    assert httpx.get(url, headers={"Host": "localhost:1234"}).status_code == 200
    # A page on another site reaching this server through DNS rebinding carries its own host name.
    assert httpx.get(url, headers={"Host": "attacker.example:8000"}).status_code == 403


class _NoStreamingTiled(BaseHTTPRequestHandler):
    """Answers like a Tiled server without a streaming cache: 500 to the websocket, 401 to a wrong key."""

    protocol_version = "HTTP/1.1"  # websockets rejects an HTTP/1.0 answer before reading its status

    def do_GET(self) -> None:
        status = 401 if self.headers.get("Authorization") != "Apikey good" else 500
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_server_without_streaming_cache_fails_with_the_fix() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoStreamingTiled)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert (
            stream_url(f"{uri}/api/v1/") == f"ws://127.0.0.1:{server.server_address[1]}/api/v1/stream/single/"
        )
        with pytest.raises(ConfigError, match=r"500.*streaming_cache"):
            check_streaming(uri, "good")
        with pytest.raises(ConfigError, match=r"refused the websocket \(401\).*--tiled-api-key"):
            check_streaming(uri, "bad")
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(PublishError, match="no websocket to Tiled"):
        check_streaming(uri, "good", timeout_s=2.0)


# -- a real Tiled server, the viewer, and headless Chromium ----------------------------------------------


class DevTools:
    """The few Chrome DevTools Protocol calls the tests need, over one page's websocket."""

    def __init__(self, socket: ClientConnection) -> None:
        self._socket = socket
        self._next_id = 0

    def call(self, method: str, **params: object) -> dict:
        self._next_id += 1
        self._socket.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:  # events are not enabled, but skip any that come
            reply = json.loads(self._socket.recv(timeout=WAIT_S + 5))
            if reply.get("id") == self._next_id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def evaluate(self, expression: str) -> object:
        """The value of a JavaScript expression; a promise is awaited."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, condition: str) -> object:
        """Poll a JavaScript expression in the page until it is truthy; its value."""
        return self.evaluate(
            f"""new Promise((resolve, reject) => {{
                const deadline = Date.now() + {WAIT_S * 1000};
                const check = () => {{
                    let value;
                    try {{ value = ({condition}); }} catch (error) {{ value = undefined; }}
                    if (value) resolve(value);
                    else if (Date.now() > deadline) reject(new Error("timeout: " + {json.dumps(condition)}));
                    else setTimeout(check, 5);
                }};
                check();
            }})"""
        )


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevTools]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail(f"the viewer tests need Debian's chromium: {CHROMIUM_INSTALL}")
    profile = tmp_path_factory.mktemp("chromium")
    log = (profile / "chromium.log").open("wb")
    process = subprocess.Popen(
        [
            chromium,
            "--headless=new",
            # The sandbox needs user namespaces, which containers and root lack; this browser opens
            # only the viewer on loopback.
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--window-size=1280,1024",
            "about:blank",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + WAIT_S
        # Chromium writes its port here once it listens (port 0: it picks a free one).
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            assert process.poll() is None, (profile / "chromium.log").read_text()
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=WAIT_S).json()
        page = next(target for target in targets if target["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=WAIT_S) as socket:
            yield DevTools(socket)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTiledServer]:
    with EmbeddedTiledServer(tmp_path_factory.mktemp("tiled"), api_key=generate_api_key()) as server:
        yield server


@pytest.fixture
def stage_metrics() -> Iterator[str]:
    """A /metrics endpoint whose ingest counter goes up all the time, like a stage during a scan."""
    registry = CollectorRegistry()
    received = Counter("phasestream_frames_received", "frames", ["stage", "worker"], registry=registry)
    series = received.labels(stage="ingest", worker="0")
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    stop = threading.Event()

    def count() -> None:
        while not stop.wait(0.02):
            series.inc(64)

    counting = threading.Thread(target=count, daemon=True)
    counting.start()
    yield f"http://127.0.0.1:{server.server_port}/metrics"
    stop.set()
    counting.join()
    server.shutdown()
    server.server_close()
    thread.join()


def _scan_arrays() -> dict[str, np.ndarray]:
    """A public simulated ptychography object and probe, with its scan in metres."""
    setup = np.load(DATA / "ptycho_sim_tike_setup.npz")
    pixel_size_m = 10e-9
    centres_px = setup["scan_px"].astype(np.float64) + 8  # tike gives 16 × 16 window corners
    return {
        "object": setup["object"][0],
        "probe": setup["probe"].reshape(2, 16, 16),
        "positions": centres_px * pixel_size_m,
        "pixel_size_m": np.float64(pixel_size_m),
    }


def _dom_change(devtools: DevTools, element_id: str, text: str) -> None:
    """Arm a MutationObserver that records (in the page's clock, ms) when the element shows ``text``."""
    devtools.evaluate(
        f"""window.changedAt = new Promise((resolve) => {{
            const element = byId({json.dumps(element_id)});
            const observer = new MutationObserver(() => {{
                if (element.textContent === {json.dumps(text)}) {{
                    observer.disconnect();
                    resolve(Date.now());
                }}
            }});
            observer.observe(element, {{ childList: true, characterData: true, subtree: true }});
        }}); true"""
    )


@pytest.mark.slow
def test_browser_follows_a_live_scan(
    browser: DevTools,
    tiled: EmbeddedTiledServer,
    stage_metrics: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    arrays = _scan_arrays()
    scan_uid = uuid.uuid4().hex
    with Viewer(tiled.uri, tiled.api_key, metrics_urls=[stage_metrics], metrics_period_s=0.25) as viewer:
        browser.call("Page.navigate", url=viewer.url)
        # A fresh Tiled holds no /reconstructions yet: the page says it waits.
        browser.wait_for("document.readyState === 'complete' && byId('link').dataset.state === 'waiting'")
        assert browser.evaluate("byId('scan-uid').textContent") == "no scan yet"

        with TiledPublisher(tiled.uri, tiled.api_key, stage="publish", worker="viewer-test") as publisher:
            publisher.submit_metadata(
                scan_uid, {"scan_uid": scan_uid, "status": "running", "planned_frames": 169}
            )
            publisher.submit_array(scan_uid, "object", arrays["object"])
            publisher.submit_array(scan_uid, "probe", arrays["probe"])
            publisher.submit_array(scan_uid, "positions", arrays["positions"])
            publisher.submit_metadata(
                scan_uid,
                {
                    "algorithm": "epie-batched",
                    "iteration": 1,
                    "positions_used": 169,
                    "object_pixel_size_m": float(arrays["pixel_size_m"]),
                    "origin_m": [0.0, 0.0],
                    "quality": {"r_factor": 0.0625, "fourier_error": 0.5},
                },
            )
            assert publisher.flush(WAIT_S) and publisher.failed == 0

            # The scan, its figures, both object images, the probe and the positions appear.
            browser.wait_for(f"byId('scan-uid').textContent === '{scan_uid}'")
            browser.wait_for("byId('iteration').textContent === '1'")
            assert browser.evaluate("byId('r-factor').textContent") == "0.06250"
            assert browser.evaluate("byId('link').dataset.state") == "live"
            for name in ("amplitude", "phase", "probe"):
                browser.wait_for(f"byId('{name}').complete && byId('{name}').naturalWidth")
            assert browser.evaluate("byId('amplitude').naturalWidth") == 128
            assert browser.evaluate("byId('probe').naturalWidth") == 16
            browser.wait_for("byId('positions-note').textContent === '169 probe centres'")
            drawn = browser.evaluate(
                """(() => { const c = byId('amplitude-positions');
                    const pixels = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    let opaque = 0; for (let i = 3; i < pixels.length; i += 4) opaque += pixels[i] > 0;
                    return opaque; })()"""
            )
            assert drawn > 169  # every centre is a small square of several pixels
            assert browser.evaluate("byId('mosaic-panel').hidden") is True

            # Frames/s per stage, scraped from the stage's /metrics.
            rate = browser.wait_for(
                """(() => { const row = [...document.querySelectorAll('#stages tbody tr')]
                    .find((r) => r.cells[0].textContent === 'ingest');
                    const rate = row && Number(row.cells[1].textContent);
                    return rate > 0 && rate; })()"""
            )
            assert 100 < rate < 100_000  # 64 frames every 20 ms, on a loaded machine

            # A mosaic published later shows up in its own panel.
            mosaic = np.abs(arrays["object"]).astype(np.float32)
            publisher.submit_array(scan_uid, "mosaic", mosaic)
            browser.wait_for("!byId('mosaic-panel').hidden && byId('mosaic').naturalWidth === 128")

            # Latency: a metadata write to Tiled until the iteration in the DOM changes.
            writer = from_uri(tiled.uri, api_key=tiled.api_key)
            scan_node = writer["reconstructions"][scan_uid]
            latencies_s = []
            for iteration in range(2, 12):
                _dom_change(browser, "iteration", str(iteration))
                written_s = time.time()
                scan_node.update_metadata({"iteration": iteration}, drop_revision=True)
                changed_ms = browser.evaluate("window.changedAt")
                latencies_s.append(changed_ms / 1000 - written_s)
            writer.context.close()
            # A new object estimate replaces the images.
            shown_phase = browser.evaluate("byId('phase').src")
            publisher.submit_array(scan_uid, "object", arrays["object"] * np.exp(0.5j))
            browser.wait_for(f"byId('phase').src !== {json.dumps(shown_phase)} && byId('phase').complete")

        screenshot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        page_html = browser.evaluate("document.documentElement.outerHTML")
        state = httpx.get(f"{viewer.url}state").text

    (tmp_path / "viewer.png").write_bytes(screenshot)
    if os.environ.get("PHASESTREAM_VIEWER_SCREENSHOT"):
        Path(os.environ["PHASESTREAM_VIEWER_SCREENSHOT"]).write_bytes(screenshot)
    pixels = decode_png(screenshot)
    assert pixels.shape[0] > 500 and pixels.shape[1] > 1000
    # Not a blank or error page: the images and text give thousands of distinct colours.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000

    median_ms = statistics.median(latencies_s) * 1000
    print(f"\nTiled write → DOM: median {median_ms:.0f} ms, max {max(latencies_s) * 1000:.0f} ms over 10")
    assert all(0 < latency < WAIT_S for latency in latencies_s)

    # The key reached neither the page nor any log of this process.
    assert tiled.api_key not in page_html and tiled.api_key not in state
    assert tiled.api_key not in caplog.text


@pytest.mark.slow
def test_viewer_comes_back_after_tiled_restarts(tiled: EmbeddedTiledServer) -> None:
    """Shares the module's Tiled server (starting one takes seconds here: a catalog-init subprocess), so
    it must stay the module's last test: it stops that server and serves its catalog on its port again."""
    uri, api_key = tiled.uri, tiled.api_key
    port = int(uri.rsplit(":", 1)[1])
    shown_uid = uuid.uuid4().hex
    with TiledPublisher(uri, api_key) as publisher:
        publisher.submit_metadata(shown_uid, {"status": "running"})
        publisher.submit_array(shown_uid, "object", _scan_arrays()["object"])
        publisher.submit_metadata(shown_uid, {"iteration": 11})
        assert publisher.flush(WAIT_S)
    with Viewer(uri, api_key, resync_s=0.3) as viewer:
        # The newest scan in Tiled is shown at once, with its latest figures and images.
        state = _wait_for_state(viewer, lambda s: "amplitude" in s["images"])
        assert state["scan"]["uid"] == shown_uid and state["scan"]["iteration"] == 11
        assert state["link"]["state"] == LinkState.LIVE

        # A subscription that stops delivering (ended here behind the follower's back) does not leave the
        # page stale: the link check reads what Tiled holds (and subscribes again).
        viewer._follower._reconstructions_subscription.disconnect()
        with TiledPublisher(uri, api_key) as publisher:
            publisher.submit_metadata(shown_uid, {"iteration": 12})
            assert publisher.flush(WAIT_S)
        _wait_for_state(viewer, lambda s: (s["scan"] or {}).get("iteration") == 12)

        tiled.__exit__(None, None, None)  # Tiled stops under the running viewer
        _wait_for_state(viewer, lambda s: s["link"]["state"] == LinkState.UNREACHABLE)
        # tiled's own server, not EmbeddedTiledServer: the latter's free-port probe refuses a port that
        # still has connections in TIME_WAIT, which uvicorn (SO_REUSEADDR) binds without trouble.
        with SimpleTiledServer(directory=tiled.directory, api_key=api_key, port=port):
            _wait_for_state(viewer, lambda s: s["link"]["state"] == LinkState.LIVE)
            with TiledPublisher(uri, api_key) as publisher:
                # The restarted server numbers its updates from 1 again: they must still arrive.
                publisher.submit_metadata(shown_uid, {"iteration": 13})
                assert publisher.flush(WAIT_S)
                _wait_for_state(viewer, lambda s: (s["scan"] or {}).get("iteration") == 13)
                # A new scan takes over the page.
                publisher.submit_metadata("scan-b", {"iteration": 7})
                assert publisher.flush(WAIT_S)
                state = _wait_for_state(viewer, lambda s: (s["scan"] or {}).get("uid") == "scan-b")
                # In one step: the new scan's figures, and none of the old scan's images.
                assert state["images"] == {} and state["scan"]["iteration"] == 7


def _wait_for_state(viewer: Viewer, condition) -> dict:
    version, summary = viewer.view.snapshot()
    deadline = time.monotonic() + WAIT_S
    while not condition(state := json.loads(summary)):
        assert time.monotonic() < deadline, f"timed out; the viewer shows {state}"
        newer = viewer.view.wait_newer(version, max(0.0, deadline - time.monotonic()))
        if newer is not None:
            version, summary = newer
    return state


def test_only_tiled_s_error_from_a_subscription_stopped_mid_retry_is_kept_off_the_console() -> None:
    reported: list[tuple[str, str]] = []
    hook = quiet_stopped_subscriptions(lambda args: reported.append((args.thread.name, str(args.exc_value))))
    for name, error in [
        ("tiled-subscription-ws://x/a", RuntimeError(STOPPED_WHILE_RECONNECTING)),
        ("tiled-subscription-ws://x/b", RuntimeError("something else")),
        ("viewer-tiled", RuntimeError(STOPPED_WHILE_RECONNECTING)),
    ]:
        thread = threading.Thread(name=name)
        hook(threading.ExceptHookArgs((type(error), error, None, thread)))
    assert reported == [
        ("tiled-subscription-ws://x/b", "something else"),
        ("viewer-tiled", STOPPED_WHILE_RECONNECTING),
    ]
