/* Job page: the header, event log and per-layer charts follow the job live; figures,
   artifacts and the timeline are re-read from the server when the phase or state changes. */
(function () {
  "use strict";
  var dataEl = document.getElementById("job-data");
  if (!dataEl) return;
  var data = JSON.parse(dataEl.textContent);
  var job = data.job;
  var layers = new Map();
  data.layers.forEach(function (p) { layers.set(p.layer, p); });
  var head = document.getElementById("job-head");
  var seen = new Set();
  document.querySelectorAll("#event-log tr[data-event-id]").forEach(function (tr) {
    seen.add(Number(tr.dataset.eventId));
  });

  function drawCharts() {
    var pts = Array.from(layers.values()).sort(function (a, b) { return a.layer - b.layer; });
    SGCharts.bars(document.getElementById("chart-heads"), pts, "heads_kept", "attn");
    SGCharts.bars(document.getElementById("chart-channels"), pts, "channels_kept", "ffn");
    SGCharts.lines(document.getElementById("chart-error"), pts, [
      { key: "attn_error", cls: "attn", label: "attention" },
      { key: "ffn_error", cls: "ffn", label: "FFN" }]);
  }

  function setHead(j) {
    head.dataset.state = j.state;
    if (["succeeded", "failed", "cancelled"].indexOf(j.state) >= 0) {
      var notice = head.querySelector(".notice");  // "cancel requested" is history now
      if (notice) notice.remove();
    }
    var badge = head.querySelector('[data-field="state"]');
    badge.className = "badge state-" + j.state;
    badge.textContent = j.state + (j.cancel_requested && j.state === "running" ? " \u00b7 cancelling" : "");
    var pct = Number(j.percent || 0);
    head.querySelector('[data-field="progress"]').value = pct;
    head.querySelector('[data-field="percent"]').textContent = Math.round(pct) + "%";
    head.querySelector('[data-field="phase"]').textContent = SG.phaseText(j);
    head.querySelector('[data-field="eta"]').textContent =
      j.state === "running" && j.eta_s ? SG.duration(j.eta_s) : "\u2014";
    var dur = head.querySelector('[data-field="duration"]');
    dur.dataset.started = j.started_at || "";
    dur.dataset.finished = j.finished_at || "";
  }

  function tickDuration() {
    var current = document.querySelector("#timeline .span.current");
    if (current && current.dataset.start) {  // the running phase's time grows too
      current.querySelector(".secs").textContent =
        SG.duration((Date.now() - Date.parse(current.dataset.start)) / 1000);
    }
    var dur = head.querySelector('[data-field="duration"]');
    if (!dur.dataset.started) return;
    var end = dur.dataset.finished ? Date.parse(dur.dataset.finished) : Date.now();
    dur.textContent = SG.duration((end - Date.parse(dur.dataset.started)) / 1000);
  }

  function td(text, cls) {
    var c = document.createElement("td");
    if (cls) c.className = cls;
    c.textContent = text === null || text === undefined ? "" : String(text);
    return c;
  }

  function logEvent(ev) {
    var tbody = document.querySelector("#event-log tbody");
    var wrap = document.querySelector(".log-wrap");
    var atBottom = wrap.scrollTop + wrap.clientHeight >= wrap.scrollHeight - 8;
    var tr = document.createElement("tr");
    tr.dataset.eventId = ev.id;
    tr.className = "fresh";
    tr.appendChild(td(ev.seq, "num"));
    var t = document.createElement("td");
    var time = document.createElement("time");
    time.setAttribute("datetime", ev.time);
    time.setAttribute("data-clock", "");
    time.textContent = SG.clock(ev.time);
    t.appendChild(time);
    tr.appendChild(t);
    tr.appendChild(td(ev.state));
    tr.appendChild(td(ev.phase));
    tr.appendChild(td(ev.layer, "num"));
    tr.appendChild(td(ev.percent === null || ev.percent === undefined ? "" : Math.round(ev.percent), "num"));
    tr.appendChild(td(ev.message));
    tbody.appendChild(tr);
    if (atBottom) wrap.scrollTop = wrap.scrollHeight;
  }

  /* Figures, artifacts and timeline come from the server's own rendering of this page. */
  var refreshing = false, again = false;
  function refreshPanels() {
    if (refreshing) { again = true; return; }
    refreshing = true;
    fetch(location.pathname, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (!html) return;
        var doc = new DOMParser().parseFromString(html, "text/html");
        ["job-summary", "timeline"].forEach(function (id) {
          var fresh = doc.getElementById(id), old = document.getElementById(id);
          if (fresh && old) old.replaceChildren.apply(old, Array.from(fresh.childNodes));
        });
        SG.refreshTimes();
      })
      .catch(function () {})
      .finally(function () {
        refreshing = false;
        if (again) { again = false; refreshPanels(); }
      });
  }

  var redraw = SG.batcher(drawCharts);
  var update = SG.batcher(function (batch) { batch.forEach(function (j) { setHead(j); }); });

  drawCharts();
  tickDuration();
  setInterval(tickDuration, 1000);
  var resizeTimer = null;
  window.addEventListener("resize", function () {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(drawCharts, 150);
  });

  SG.stream("/ui/stream?job_id=" + encodeURIComponent(job.id) + "&after=" + data.after, function (ev) {
    if (seen.has(ev.id)) return;
    seen.add(ev.id);
    logEvent(ev);
    var j = ev.job;
    update("job", j);
    var m = ev.metrics || {};
    if (m.kind === "layer_done" && ev.layer !== null && ev.layer !== undefined) {
      layers.set(ev.layer, { layer: ev.layer, heads_kept: m.heads_kept, channels_kept: m.channels_kept,
                             attn_error: m.attn_error, ffn_error: m.ffn_error });
      redraw("charts", true);
    }
    if (j.phase !== job.phase || j.state !== job.state || j.cancel_requested !== job.cancel_requested) {
      refreshPanels();
    }
    job = j;
  });
})();
