/* Shared helpers of the SlimGPT dashboard: time formatting, the live stream, small DOM utils.
   No library: the pages must work with no internet and no build step. */
(function () {
  "use strict";
  var SG = (window.SG = {});

  SG.csrf = function () {
    var m = document.querySelector('meta[name="csrf-token"]');
    return m ? m.getAttribute("content") : "";
  };

  SG.duration = function (s) {
    if (s === null || s === undefined || isNaN(s)) return "\u2014";
    s = Number(s);
    if (s < 60) return (s < 10 ? s.toFixed(1) : Math.round(s)) + " s";
    var t = Math.round(s), m = Math.floor(t / 60), sec = t % 60;
    if (m < 60) return m + " min " + String(sec).padStart(2, "0") + " s";
    var h = Math.floor(m / 60);
    m = m % 60;
    if (h < 48) return h + " h " + String(m).padStart(2, "0") + " min";
    return Math.floor(h / 24) + " d " + (h % 24) + " h";
  };

  SG.ago = function (iso) {
    var t = Date.parse(iso);
    if (isNaN(t)) return "";
    var s = Math.max(0, (Date.now() - t) / 1000);
    if (s < 45) return "just now";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    if (s < 86400 * 2) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " d ago";
  };

  SG.clock = function (iso) {
    var d = new Date(iso);
    if (isNaN(d.getTime())) return "";
    var today = new Date().toDateString() === d.toDateString();
    return today ? d.toLocaleTimeString() : d.toLocaleString();
  };

  SG.refreshTimes = function (root) {
    (root || document).querySelectorAll("time[data-age]").forEach(function (el) {
      var iso = el.getAttribute("datetime");
      if (!iso) return;
      el.textContent = SG.ago(iso);
      el.title = new Date(iso).toLocaleString();
    });
    (root || document).querySelectorAll("time[data-clock]").forEach(function (el) {
      var iso = el.getAttribute("datetime");
      if (iso) el.textContent = SG.clock(iso);
    });
  };

  SG.phaseText = function (job) {
    if (job.state === "running" && job.phase === "pruning" && job.num_layers) {
      var done = job.layer === null || job.layer === undefined ? 0 : job.layer + 1;
      return "pruning " + done + "/" + job.num_layers;
    }
    if (job.state === "running" || job.state === "queued") return job.phase || job.state;
    if (job.state === "succeeded") return "done";
    return job.phase || "";
  };

  SG.setLive = function (state) {
    var el = document.getElementById("live");
    if (el) el.setAttribute("data-state", state);
  };

  /* One EventSource per page. The session cookie authenticates it; nothing secret is in the
     URL. The browser reconnects by itself and resumes with Last-Event-ID. */
  SG.stream = function (url, onEvent) {
    if (!window.EventSource) {
      SG.setLive("offline");
      return null;
    }
    var es = new EventSource(url);
    es.onopen = function () { SG.setLive("open"); };
    es.onerror = function () {
      SG.setLive(es.readyState === EventSource.CLOSED ? "offline" : "reconnecting");
      if (es.readyState === EventSource.CLOSED) SG.checkSession();
    };
    es.addEventListener("job", function (e) {
      var data;
      try { data = JSON.parse(e.data); } catch (err) { return; }
      onEvent(data);
    });
    es.addEventListener("end", function () {
      es.close();
      SG.setLive("offline");
      SG.checkSession();
    });
    return es;
  };

  /* A stream that stopped may mean the session ended (key revoked, cookie expired). */
  SG.checkSession = function () {
    fetch("/ui/counts", { credentials: "same-origin" }).then(function (r) {
      if (r.status === 401) window.location.assign("/ui/login?next=" + encodeURIComponent(location.pathname));
    }).catch(function () {});
  };

  /* Collect updates and apply them at most every 100 ms, so a burst of events costs one
     layout instead of hundreds. */
  SG.batcher = function (apply) {
    var pending = new Map(), timer = null;
    return function (key, value) {
      pending.set(key, value);
      if (timer) return;
      timer = setTimeout(function () {
        timer = null;
        var batch = pending;
        pending = new Map();
        apply(batch);
      }, 100);
    };
  };

  document.addEventListener("DOMContentLoaded", function () {
    if (!document.getElementById("stream") && !document.getElementById("job-data") && !document.getElementById("fleet-body")) SG.setLive("none");
    SG.refreshTimes();
    setInterval(SG.refreshTimes, 20000);
  });
})();
