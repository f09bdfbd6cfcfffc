// moea dashboard: polls /ui/api/experiments/<id> and redraws each experiment's table cells and SVG chart.
// Plain JavaScript and SVG, no library, nothing fetched from outside the gateway (works offline).
"use strict";
(function () {
  const POLL_MS = 3000;
  const COLORS = ["#2f6fde", "#d2822d", "#2e8540", "#8e44ad", "#c0392b", "#16a085"];
  const SVG = "http://www.w3.org/2000/svg";

  function el(name, attrs, text) {
    const node = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function fmt(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }

  function drawChart(svg, series) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const W = 720, H = 220, L = 44, R = 44, T = 10, B = 24;
    const maxN = Math.max(1, ...series.flatMap(s => s.points.map(p => p.requests)));
    const means = series.flatMap(s => s.points.map(p => p.mean)).filter(m => m !== null);
    const lo = means.length ? Math.min(0, ...means) : 0, hi = means.length ? Math.max(1, ...means) : 1;
    const t0 = series.length && series[0].points.length ? series[0].points[0].t : 0;
    const t1 = series.length && series[0].points.length ? series[0].points[series[0].points.length - 1].t : 1;
    const x = t => L + (W - L - R) * ((t - t0) / Math.max(1e-9, t1 - t0));
    const yN = n => H - B - (H - T - B) * (n / maxN);
    const yM = m => H - B - (H - T - B) * ((m - lo) / Math.max(1e-9, hi - lo));
    svg.appendChild(el("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#bbb"}));
    svg.appendChild(el("text", {x: 4, y: T + 10}, String(maxN)));
    svg.appendChild(el("text", {x: 4, y: H - B}, "0"));
    svg.appendChild(el("text", {x: W - R + 4, y: T + 10}, fmt(hi, 2)));
    svg.appendChild(el("text", {x: W - R + 4, y: H - B}, fmt(lo, 2)));
    series.forEach((s, i) => {
      const color = COLORS[i % COLORS.length];
      const counts = s.points.map(p => `${x(p.t).toFixed(1)},${yN(p.requests).toFixed(1)}`).join(" ");
      svg.appendChild(el("polyline", {points: counts, fill: "none", stroke: color, "stroke-width": 2}));
      const scored = s.points.filter(p => p.mean !== null);
      if (scored.length) {
        const pts = scored.map(p => `${x(p.t).toFixed(1)},${yM(p.mean).toFixed(1)}`).join(" ");
        svg.appendChild(el("polyline", {points: pts, fill: "none", stroke: color, "stroke-dasharray": "4 3"}));
      }
      svg.appendChild(el("text", {x: L + 8 + 90 * i, y: H - 6, fill: color}, `v${s.version}`));
    });
  }

  function updateTable(section, report) {
    report.arms.forEach(arm => {
      const row = section.querySelector(`tr[data-version="${arm.version}"]`);
      if (!row) return;
      const set = (field, text) => { const c = row.querySelector(`[data-field="${field}"]`); if (c) c.textContent = text; };
      set("requests", arm.requests); set("users", arm.users); set("errors", arm.errors); set("outcomes", arm.outcomes);
      set("mean", `${fmt(arm.mean, 3)} [${fmt(arm.low, 3)}, ${fmt(arm.high, 3)}]`);
      set("latency", `${fmt(arm.p50_ms, 0)} / ${fmt(arm.p95_ms, 0)} ms`);
      if (arm.comparison) {
        const c = arm.comparison;
        set("comparison", c.interval[0] === null ? "no outcomes to compare yet"
          : `[${fmt(c.interval[0], 3)}, ${fmt(c.interval[1], 3)}], p ${fmt(c.p_value, 4)}${c.significant ? " significant" : ""}`);
      }
    });
    const setTop = (field, text) => { const c = section.querySelector(`[data-field="${field}"]`); if (c) c.textContent = text; };
    setTop("unit", report.unit);
    setTop("decision", report.recommendation.decision);
    setTop("recommendation", report.recommendation.text);
    setTop("srm", `${report.srm.flagged ? "MISMATCH" : "ok"} (χ² ${fmt(report.srm.chi2, 2)}, p ${fmt(report.srm.p_value, 4)})`);
  }

  async function refresh(section) {
    const id = section.dataset.experiment;
    try {
      const response = await fetch(`/ui/api/experiments/${id}`, {credentials: "same-origin"});
      if (!response.ok) return;
      const data = await response.json();
      updateTable(section, data.report);
      drawChart(section.querySelector("svg.chart"), data.series);
      section.dataset.updated = String(data.generated_at);
    } catch (error) { /* the next poll tries again */ }
  }

  document.querySelectorAll("section.experiment").forEach(section => {
    refresh(section);
    if (section.dataset.status === "running") setInterval(() => refresh(section), POLL_MS);
  });
})();
