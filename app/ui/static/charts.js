/* Small hand-written SVG charts for the per-layer figures: bars (kept heads / channels) and
   lines with one marker per layer (reconstruction errors, log scale when they span decades). */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var PAD = { l: 52, r: 12, t: 10, b: 26 };
  var FONT = 11;

  /* Margins and marks follow the page's font size, so a wall screen gets larger labels. */
  function scale() {
    FONT = Math.round(0.72 * (parseFloat(getComputedStyle(document.documentElement).fontSize) || 15));
    PAD = { l: Math.round(FONT * 4.4), r: Math.round(FONT), t: Math.round(FONT * 0.9),
            b: Math.round(FONT * 2.3) };
  }

  function el(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (parent) parent.appendChild(node);
    return node;
  }

  function niceTicks(lo, hi, n) {
    if (hi <= lo) hi = lo + 1;
    var step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n)));
    var err = (hi - lo) / n / step;
    if (err >= 7.5) step *= 10; else if (err >= 3.5) step *= 5; else if (err >= 1.5) step *= 2;
    var ticks = [];
    // From at or below lo to at or above hi, so every mark stays inside the plot.
    var first = Math.floor(lo / step + 1e-9), last = Math.ceil(hi / step - 1e-9);
    for (var i = first; i <= last; i++) ticks.push(i * step);
    return ticks;
  }

  function fmt(v) {
    var a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 1e4 || a < 1e-2) return v.toExponential(0);
    if (a >= 100) return String(Math.round(v));
    return String(Math.round(v * 100) / 100);
  }

  function frame(container, points) {
    scale();
    container.textContent = "";
    var w = Math.max(200, container.clientWidth), h = Math.max(120, container.clientHeight);
    var svg = el("svg", { viewBox: "0 0 " + w + " " + h, role: "img" }, container);
    if (!points.length) {
      el("text", { x: w / 2, y: h / 2, "text-anchor": "middle", class: "empty" }, svg)
        .textContent = "no layer pruned yet";
      return null;
    }
    var n = points.length;
    var maxLayer = points[n - 1].layer, minLayer = points[0].layer;
    var span = Math.max(1, maxLayer - minLayer + 1);
    var slot = (w - PAD.l - PAD.r) / span;
    return {
      svg: svg, w: w, h: h, slot: slot,
      x: function (layer) { return PAD.l + (layer - minLayer + 0.5) * slot; },
      layers: function () {
        var every = Math.max(1, Math.ceil(span / Math.max(1, (w - PAD.l - PAD.r) / (FONT * 2.6))));
        for (var i = minLayer; i <= maxLayer; i++) {
          if ((i - minLayer) % every) continue;
          el("text", { x: PAD.l + (i - minLayer + 0.5) * slot, y: h - PAD.b + FONT * 1.5, "text-anchor": "middle" }, svg)
            .textContent = String(i);
        }
        el("line", { x1: PAD.l, x2: w - PAD.r, y1: h - PAD.b, y2: h - PAD.b, class: "axis" }, svg);
      }
    };
  }

  function yAxis(f, ticks, y) {
    ticks.forEach(function (v) {
      var yy = y(v);
      el("line", { x1: PAD.l, x2: f.w - PAD.r, y1: yy, y2: yy, class: "grid" }, f.svg);
      el("text", { x: PAD.l - FONT * 0.5, y: yy + FONT * 0.35, "text-anchor": "end" }, f.svg).textContent = fmt(v);
    });
  }

  function bars(container, points, key, cls) {
    var pts = points.filter(function (p) { return typeof p[key] === "number"; });
    var f = frame(container, pts);
    if (!f) return;
    var max = Math.max.apply(null, pts.map(function (p) { return p[key]; }));
    var ticks = niceTicks(0, max, 4);
    var top = ticks[ticks.length - 1] || 1;
    var y = function (v) { return f.h - PAD.b - (v / top) * (f.h - PAD.t - PAD.b); };
    yAxis(f, ticks, y);
    var bw = Math.max(1, Math.min(f.slot * 0.72, 48));
    pts.forEach(function (p) {
      var r = el("rect", { x: f.x(p.layer) - bw / 2, y: y(p[key]), width: bw,
        height: Math.max(0, f.h - PAD.b - y(p[key])), class: "bar " + cls, "data-layer": p.layer }, f.svg);
      el("title", {}, r).textContent = "layer " + p.layer + ": " + p[key];
    });
    f.layers();
  }

  function lines(container, points, series) {
    var values = [];
    points.forEach(function (p) {
      series.forEach(function (s) { if (typeof p[s.key] === "number") values.push(p[s.key]); });
    });
    var f = frame(container, values.length ? points : []);
    if (!f) return;
    var pos = values.filter(function (v) { return v > 0; });
    var lo = Math.min.apply(null, values), hi = Math.max.apply(null, values);
    var log = pos.length === values.length && hi / Math.max(lo, 1e-30) > 100;
    var y, ticks;
    var inner = f.h - PAD.t - PAD.b;
    if (log) {
      var a = Math.floor(Math.log10(lo)), b = Math.ceil(Math.log10(hi));
      if (b === a) b = a + 1;
      ticks = [];
      var stride = Math.max(1, Math.ceil((b - a) / 5));
      for (var e = a; e <= b; e += stride) ticks.push(Math.pow(10, e));
      y = function (v) { return f.h - PAD.b - ((Math.log10(v) - a) / (b - a)) * inner; };
    } else {
      ticks = niceTicks(Math.min(0, lo), hi, 4);
      var t0 = ticks[0], t1 = ticks[ticks.length - 1] || 1;
      y = function (v) { return f.h - PAD.b - ((v - t0) / (t1 - t0 || 1)) * inner; };
    }
    yAxis(f, ticks, y);
    series.forEach(function (s) {
      var pts = points.filter(function (p) { return typeof p[s.key] === "number"; });
      if (!pts.length) return;
      var d = pts.map(function (p, i) { return (i ? "L" : "M") + f.x(p.layer).toFixed(1) + "," + y(p[s.key]).toFixed(1); }).join(" ");
      el("path", { d: d, class: "line " + s.cls }, f.svg);
      pts.forEach(function (p) {
        var c = el("circle", { cx: f.x(p.layer), cy: y(p[s.key]), r: Math.max(2.5, FONT * 0.28), class: "pt " + s.cls, "data-layer": p.layer }, f.svg);
        el("title", {}, c).textContent = s.label + ", layer " + p.layer + ": " + p[s.key].toPrecision(4);
      });
    });
    f.layers();
  }

  window.SGCharts = { bars: bars, lines: lines };
})();
