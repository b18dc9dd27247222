"""Frames/s per stage for the live viewer, from the stages' own Prometheus ``/metrics`` endpoints.

The viewer scrapes every endpoint it was given (one per stage worker process, as ``phasestream run``
prints them) once per period, on the server side, and turns the change of each counter between two
scrapes into a rate, summed over the workers of a stage. A counter that went down was reset (its process
restarted): the whole new value counts as its increase, as Prometheus's ``rate()`` does. A series seen for
the first time has no rate until the next scrape.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from phasestream.errors import ConfigError

logger = logging.getLogger(__name__)

# Column of the page's stage table -> the counter sample it is the rate of.
RATE_COUNTERS = {
    "frames_in_per_s": "phasestream_frames_received_total",
    "frames_out_per_s": "phasestream_frames_sent_total",
    "iterations_per_s": "phasestream_iterations_total",
}
SCRAPE_TIMEOUT_S = 2.0

# (endpoint URL, sample name, stage, worker) -> counter value
CounterValues = dict[tuple[str, str, str, str], float]


@dataclass(frozen=True)
class Scrape:
    """The counters of every endpoint at one moment, and the endpoints that did not answer."""

    time_s: float
    values: CounterValues
    errors: dict[str, str]


def metrics_url(text: str) -> str:
    """``http://host:port/metrics`` from a full URL, ``http://host:port``, ``host:port`` or a bare port."""
    text = text.strip()
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    if "://" not in text:
        text = f"http://{text}"
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise ConfigError(
            f"--metrics {text!r} is not a URL ({exc}): use e.g. http://127.0.0.1:9101/metrics"
        ) from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"--metrics {text!r} is not an http URL: use e.g. http://127.0.0.1:9101/metrics")
    return str(url.copy_with(path="/metrics")) if url.path in ("", "/") else str(url)


def parse_counters(url: str, text: str) -> CounterValues:
    """The ``RATE_COUNTERS`` samples in a Prometheus text exposition, keyed with ``url``."""
    wanted = set(RATE_COUNTERS.values())
    values: CounterValues = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                key = (url, sample.name, sample.labels.get("stage", ""), sample.labels.get("worker", ""))
                values[key] = float(sample.value)
    return values


def stage_rates(previous: Scrape, current: Scrape) -> list[dict[str, float | str]]:
    """One row per stage, in order of first appearance: the stage and its ``RATE_COUNTERS`` rates."""
    elapsed_s = current.time_s - previous.time_s
    rows: dict[str, dict[str, float | str]] = {}
    column_of = {sample: column for column, sample in RATE_COUNTERS.items()}
    for key, value in current.values.items():
        _url, sample, stage, _worker = key
        row = rows.setdefault(stage, {"stage": stage})
        before = previous.values.get(key)
        if before is None or elapsed_s <= 0:
            continue
        increase = value - before if value >= before else value
        column = column_of[sample]
        row[column] = float(row.get(column, 0.0)) + increase / elapsed_s
    return list(rows.values())


def scrape(urls: Sequence[str], client: httpx.Client) -> Scrape:
    values: CounterValues = {}
    errors: dict[str, str] = {}
    started_s = time.monotonic()
    for url in urls:
        try:
            response = client.get(url, timeout=SCRAPE_TIMEOUT_S)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            errors[url] = f"{type(exc).__name__}: {exc}"
            continue
        try:
            values.update(parse_counters(url, response.text))
        except ValueError as exc:
            errors[url] = f"not Prometheus text ({exc}): is this a stage's /metrics endpoint?"
    # The middle of the scrape: endpoints are read one after the other.
    return Scrape((started_s + time.monotonic()) / 2, values, errors)


class MetricsScraper:
    """Scrapes ``urls`` every ``period_s`` in a thread and hands each table of rates to ``publish``."""

    def __init__(
        self,
        urls: Sequence[str],
        publish: Callable[[list[dict[str, float | str]], dict[str, str]], None],
        period_s: float = 1.0,
    ) -> None:
        if period_s <= 0:
            raise ConfigError(f"metrics period {period_s!r} s must be positive")
        self._urls = [metrics_url(url) for url in urls]
        self._publish = publish
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="viewer-metrics", daemon=True)

    @property
    def urls(self) -> list[str]:
        return list(self._urls)

    def start(self) -> None:
        if self._urls:
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=SCRAPE_TIMEOUT_S * (len(self._urls) + 1))

    def _run(self) -> None:
        with httpx.Client() as client:
            previous = scrape(self._urls, client)
            while not self._stop.wait(self._period_s):
                current = scrape(self._urls, client)
                for url, error in current.errors.items():
                    if url not in previous.errors:
                        logger.warning("cannot scrape %s: %s", url, error)
                self._publish(stage_rates(previous, current), current.errors)
                previous = current
