// The live page of `phasestream view`. One Server-Sent Events stream (/events) carries the viewer's
// summary as JSON on every change; an image or the positions are fetched only when their version changes.
"use strict";

const IMAGE_NAMES = ["amplitude", "phase", "probe", "mosaic"];
const OVERLAID = ["amplitude", "phase"]; // images that show the scan positions
const shownImageVersions = {};
let state = null;
let positions = null; // {version, y_px, x_px} in object pixels
let requestedPositionsVersion = null;

function byId(id) {
  return document.getElementById(id);
}

function setText(id, text) {
  const element = byId(id);
  if (element.textContent !== text) element.textContent = text;
}

function formatFigure(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toPrecision(digits);
}

function formatRate(value) {
  if (value === undefined) return "–";
  return value >= 100 ? Math.round(value).toString() : value.toFixed(1);
}

function showScan(scan) {
  setText("scan-uid", scan ? scan.uid : "no scan yet");
  setText("status", scan?.status ?? "");
  setText("iteration", scan?.iteration == null ? "–" : String(scan.iteration));
  setText("r-factor", formatFigure(scan?.r_factor, 4));
  setText("fourier-error", formatFigure(scan?.fourier_error, 4));
  setText("algorithm", scan?.algorithm ?? "–");
  let used = "–";
  if (scan?.positions_used != null) {
    used = scan.planned_frames ? `${scan.positions_used} / ${scan.planned_frames}` : String(scan.positions_used);
  }
  setText("positions-used", used);
  showAge();
}

function showAge() {
  const updated = state?.scan?.updated_unix_s;
  setText("updated", updated ? `${Math.max(0, Math.round(Date.now() / 1000 - updated))} s ago` : "–");
}

function showLink(link) {
  const badge = byId("link");
  badge.dataset.state = link.state;
  setText("link", link.detail ? `${link.state}: ${link.detail}` : link.state);
}

function showImages(images) {
  for (const name of IMAGE_NAMES) {
    const image = images[name];
    const element = byId(name);
    if (name === "mosaic") byId("mosaic-panel").hidden = !image;
    if (!image) {
      element.removeAttribute("src");
      element.classList.add("empty");
      delete shownImageVersions[name];
      continue;
    }
    if (shownImageVersions[name] !== image.version) {
      shownImageVersions[name] = image.version;
      element.src = `image/${name}.png?v=${image.version}`;
    }
  }
}

async function loadPositions(info) {
  if (!info) {
    positions = null;
    requestedPositionsVersion = null;
    drawAllPositions();
    return;
  }
  if (info.version === requestedPositionsVersion) return;
  requestedPositionsVersion = info.version;
  const response = await fetch(`positions.json?v=${info.version}`);
  if (!response.ok) return;
  const body = await response.json();
  // Two fetches may finish out of order: keep the newer.
  if (!positions || body.version >= positions.version) positions = body;
  drawAllPositions();
}

function drawPositions(name) {
  const image = byId(name);
  const canvas = byId(`${name}-positions`);
  const shown = state?.images?.[name];
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.max(1, Math.round(image.clientWidth * ratio));
  canvas.height = Math.max(1, Math.round(image.clientHeight * ratio));
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  if (!shown || !positions || !byId("show-positions").checked) return;
  const [sourceHeight, sourceWidth] = shown.source_shape_px;
  const scaleY = canvas.height / sourceHeight;
  const scaleX = canvas.width / sourceWidth;
  const size = Math.max(3, Math.round(Math.min(canvas.width, canvas.height) / 100));
  context.fillStyle = "rgba(255, 80, 32, 0.9)";
  // Position (y, x) is the centre of object pixel (y, x): its middle is half a pixel in.
  for (let i = 0; i < positions.x_px.length; i += 1) {
    const x = (positions.x_px[i] + 0.5) * scaleX;
    const y = (positions.y_px[i] + 0.5) * scaleY;
    context.fillRect(x - size / 2, y - size / 2, size, size);
  }
}

function drawAllPositions() {
  for (const name of OVERLAID) drawPositions(name);
  const note = positions
    ? `${positions.x_px.length} probe centres`
    : "not published for this scan (needs a positions array and origin_m in Tiled)";
  setText("positions-note", note);
}

function showStages(rows, errors) {
  const body = byId("stages").tBodies[0];
  body.replaceChildren(
    ...rows.map((row) => {
      const line = document.createElement("tr");
      for (const text of [
        row.stage,
        formatRate(row.frames_in_per_s),
        formatRate(row.frames_out_per_s),
        formatRate(row.iterations_per_s),
      ]) {
        const cell = document.createElement("td");
        cell.textContent = text;
        line.append(cell);
      }
      return line;
    }),
  );
  const down = Object.entries(errors);
  let note = "";
  if (down.length) note = `not answering: ${down.map(([url, error]) => `${url} (${error})`).join("; ")}`;
  else if (!rows.length) note = "no stage metrics yet (phasestream view --metrics URL ...)";
  setText("metrics-note", note);
}

function show(next) {
  const scanChanged = state?.scan?.uid !== next.scan?.uid;
  state = next;
  setText("tiled-uri", next.tiled_uri);
  showLink(next.link);
  showScan(next.scan);
  showImages(next.images);
  showStages(next.stages, next.metrics_errors);
  if (scanChanged) positions = null;
  loadPositions(next.positions).catch((error) => console.warn("cannot load the scan positions:", error));
}

function main() {
  for (const name of IMAGE_NAMES) {
    const element = byId(name);
    element.addEventListener("load", () => {
      element.classList.remove("empty");
      if (OVERLAID.includes(name)) drawPositions(name);
    });
  }
  byId("show-positions").addEventListener("change", drawAllPositions);
  new ResizeObserver(drawAllPositions).observe(byId("images"));
  const events = new EventSource("events");
  events.onmessage = (message) => show(JSON.parse(message.data));
  events.onerror = () => showLink({ state: "offline", detail: "the viewer is not answering; retrying" });
  setInterval(showAge, 1000);
}

main();
