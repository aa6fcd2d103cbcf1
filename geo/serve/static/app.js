// The map page of `geo serve`: upload a photo to /locate and draw the answer with d3-geo.
// Everything shown comes from this server; text from answers goes through textContent, never innerHTML.
(function () {
  "use strict";
  const W = 960, H = 520, PAD = 10, EARTH_KM = 6371.0088;
  const NS = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  const svg = $("map");
  let land = null, answer = null, view = "world";

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    (parent || svg).appendChild(node);
    return node;
  }
  const degrees = (km) => (km / EARTH_KM) * 180 / Math.PI;
  const circle = (lon, lat, km) => d3.geoCircle().center([lon, lat]).radius(degrees(km)).precision(2)();
  // GeoJSON rings are counter-clockwise; d3-geo's spherical polygons want them clockwise.
  const cellShape = (c) => ({ type: "Polygon", coordinates: [c.polygon.slice().reverse()] });
  const regionShape = (g) => ({ type: "MultiPolygon",
    coordinates: g.coordinates.map((poly) => poly.map((ring) => ring.slice().reverse())) });

  function words(p) {
    if (p >= 0.9) return "almost certain";
    if (p >= 0.7) return "likely";
    if (p >= 0.4) return "plausible";
    if (p >= 0.15) return "uncertain";
    return "a rough guess";
  }
  const pct = (p) => (100 * p).toFixed(p < 0.1 ? 1 : 0) + "%";

  function projection() {
    if (view === "zoom" && answer) {
      // wide enough for the alternatives and the closest neighbours, between 50 and 3,000 km
      const far = Math.min(3000, Math.max(50, ...answer.neighbors.slice(0, 12).map((n) => n.distance_km),
        ...answer.alternatives.map((a) => d3.geoDistance([answer.lon, answer.lat], [a.lon, a.lat]) * EARTH_KM)));
      return d3.geoAzimuthalEqualArea().rotate([-answer.lon, -answer.lat])
        .fitExtent([[PAD, PAD], [W - PAD, H - PAD]], circle(answer.lon, answer.lat, far * 1.15));
    }
    return d3.geoNaturalEarth1().fitExtent([[PAD, PAD], [W - PAD, H - PAD]], { type: "Sphere" });
  }

  function draw() {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const proj = projection();
    const path = d3.geoPath(proj);
    el("path", { class: "sphere", d: path({ type: "Sphere" }) });
    el("path", { class: "graticule", d: path(d3.geoGraticule10()) });
    if (land) el("path", { class: "land", d: path(land) });
    if (!answer) return;
    const region = answer.region && answer.region.geometry ? path(regionShape(answer.region.geometry)) : null;
    if (region) el("path", { id: "region", class: "region", d: region });
    const maxProb = Math.max(1e-9, ...answer.top_cells.map((c) => c.prob));
    for (const c of answer.top_cells) {
      if (!c.polygon) continue;
      const d = path(cellShape(c));
      if (d) el("path", { class: "cell", d: d, "fill-opacity": (0.1 + 0.45 * c.prob / maxProb).toFixed(3) });
    }
    let lastLabel = Infinity;  // rings are drawn small to large; a label too close to the previous one is left out
    for (const [km, p] of Object.entries(answer.p_within || {})) {
      const d = path(circle(answer.lon, answer.lat, +km));
      if (!d) continue;
      el("path", { class: "ring", d: d });
      const top = proj([answer.lon, Math.min(89.9, answer.lat + degrees(+km))]);
      if (top && lastLabel - top[1] >= 14) {
        el("text", { class: "ring-label", x: top[0] + 4, y: top[1] - 3 }).textContent = km + " km: " + pct(p);
        lastLabel = top[1];
      }
    }
    for (const n of answer.neighbors.slice(0, 50)) {
      const xy = proj([n.lon, n.lat]);
      if (xy) el("circle", { class: "nb-dot", cx: xy[0], cy: xy[1], r: 3 });
    }
    answer.alternatives.forEach((a, i) => {
      const xy = proj([a.lon, a.lat]);
      if (xy) el("circle", { class: "alt-marker", cx: xy[0], cy: xy[1], r: 5 }).appendChild(
        document.createElementNS(NS, "title")).textContent = "alternative " + (i + 1);
    });
    const xy = proj([answer.lon, answer.lat]);
    if (xy) el("circle", { id: "answer-marker", cx: xy[0], cy: xy[1], r: 7 });
  }

  function status(text, isError) {
    $("status").textContent = text;
    $("status").className = isError ? "error" : "";
  }

  function show(a) {
    answer = null;
    $("answer").hidden = true;
    $("neighbours-box").hidden = true;
    if (a.error) { status("could not read this photo: " + a.error, true); draw(); return; }
    if (a.abstained) { status("abstained: confidence " + pct(a.confidence) + " is below the minimum", true); draw(); return; }
    answer = a;
    status("");
    $("answer").hidden = false;
    const place = a.place && a.place.name ? "  near " + [a.place.name, a.place.admin1, a.place.cc].filter(Boolean).join(", ") : "";
    $("coords").textContent = a.lat.toFixed(5) + ", " + a.lon.toFixed(5) + place + "  (" + a.mode + ")";
    const radius = a.confidence_radius_km || 0;
    $("words").textContent = words(a.confidence) + ": " + pct(a.confidence) + " that the photo was taken within " +
      radius + " km of this point";
    const basis = (a.evidence || {}).basis;
    if (basis === "prior") $("words").textContent += ". Little evidence in this photo: the answer is where the gallery's photos concentrate";
    if (basis === "near-duplicate") $("words").textContent += ". A near-duplicate of a gallery photo: answered at its spot";
    $("words").className = a.confidence < 0.15 || basis === "prior" ? "warn" : "";
    const r = a.region || {};
    $("region-words").textContent = r.area_km2 === undefined ? "" : "Region holding the truth for " +
      pct(r.coverage) + " of new photos" + (r.calibrated ? "" : " (uncalibrated)") + ": " +
      Math.round(r.area_km2).toLocaleString() + " km² in " + r.cells.length + " cells";
    const tbody = $("pwithin").querySelector("tbody");
    tbody.replaceChildren();
    for (const [km, p] of Object.entries(a.p_within || {})) {
      const tr = document.createElement("tr");
      for (const t of [km + " km", pct(p) + " (" + words(p) + ")"]) tr.appendChild(document.createElement("td")).textContent = t;
      tbody.appendChild(tr);
    }
    $("pwithin").hidden = !Object.keys(a.p_within || {}).length;
    const alts = $("alternatives");
    alts.replaceChildren();
    for (const alt of a.alternatives) {
      alts.appendChild(document.createElement("li")).textContent =
        alt.lat.toFixed(3) + ", " + alt.lon.toFixed(3) + "  score " + alt.score.toFixed(3);
    }
    if (!a.alternatives.length) alts.appendChild(document.createElement("li")).textContent = "none in this mode";
    const grid = $("neighbours");
    grid.replaceChildren();
    for (const n of a.neighbors.slice(0, 12)) {
      const fig = document.createElement("figure");
      fig.className = "neighbour";
      const img = fig.appendChild(document.createElement("img"));
      img.alt = "gallery photo " + n.id;
      img.addEventListener("error", () => fig.classList.add("missing"));
      img.src = "gallery/" + encodeURIComponent(n.id) + "/thumbnail";
      fig.appendChild(document.createElement("figcaption")).textContent =
        n.distance_km.toFixed(1) + " km from the answer · similarity " + n.similarity.toFixed(3);
      grid.appendChild(fig);
    }
    $("neighbours-box").hidden = !a.neighbors.length;
    $("view-zoom").disabled = false;
    draw();
  }

  async function locate(file) {
    if (!file) return;
    $("photo").src = URL.createObjectURL(file);
    $("photo").hidden = false;
    status("locating " + file.name + " …");
    const body = new FormData();
    body.append("images", file, file.name);
    const query = new URLSearchParams({ coverage: $("coverage").value });
    if ($("mode").value) query.set("mode", $("mode").value);
    try {
      const r = await fetch("locate?" + query, { method: "POST", body: body });
      const data = await r.json();
      if (!r.ok) { status("server said " + r.status + ": " + (data.detail || JSON.stringify(data)), true); return; }
      show(data[0]);
    } catch (e) {
      status("request failed: " + e, true);
    }
  }

  $("file").addEventListener("change", (e) => locate(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); locate(e.dataTransfer.files[0]); });
  $("view-world").addEventListener("click", () => { view = "world"; draw(); });
  $("view-zoom").addEventListener("click", () => { view = "zoom"; draw(); });

  fetch("info").then((r) => r.json()).then((info) => {
    const sel = $("mode");
    for (const m of info.modes || []) {
      const o = sel.appendChild(document.createElement("option"));
      o.value = m; o.textContent = m + (m === info.default_mode ? " (default)" : "");
      if (m === info.default_mode) o.selected = true;
    }
    const counts = info.counts || {};
    $("bundle").textContent = "index: " + (counts.ok || 0).toLocaleString() + " photos, backbone " +
      ((info.backbone || {}).name || "?");
  }).catch(() => {});
  fetch("static/vendor/countries-50m.json").then((r) => r.json()).then((topo) => {
    land = topojson.feature(topo, topo.objects.countries);
    draw();
  });
  draw();
})();
