/* Jobs page: one tenant-wide stream updates the rows on this page, adds new jobs on the first
   page, and keeps the counts current. */
(function () {
  "use strict";
  var table = document.getElementById("jobs-table");
  var body = document.getElementById("jobs-body");
  var streamEl = document.getElementById("stream");
  if (!table || !body || !streamEl) return;
  var keyNames = JSON.parse(document.getElementById("key-names").textContent || "{}");
  var page = Number(table.dataset.page || 1);
  var perPage = Number(table.dataset.perPage || 50);
  var f = { state: table.dataset.filterState, model: (table.dataset.filterModel || "").toLowerCase(),
            from: table.dataset.filterFrom, to: table.dataset.filterTo };
  var known = new Map();
  body.querySelectorAll("tr[data-job-id]").forEach(function (tr) {
    var badge = tr.querySelector('[data-field="state"]');
    known.set(tr.dataset.jobId, badge ? badge.textContent.split(" ")[0] : "");
  });
  var newElsewhere = 0;
  // Jobs created before the newest one rendered belong to other pages: update, never insert.
  var firstTime = body.querySelector("tr[data-job-id] time");
  var newest = firstTime ? firstTime.getAttribute("datetime") : "";

  function isNewer(job) {
    return !newest || Date.parse(job.created_at) > Date.parse(newest);
  }

  function matches(job) {
    if (f.state && job.state !== f.state) return false;
    if (f.model && String(job.model_id).toLowerCase().indexOf(f.model) < 0) return false;
    var day = (job.created_at || "").slice(0, 10);
    if (f.from && day < f.from) return false;
    if (f.to && day > f.to) return false;
    return true;
  }

  function fill(tr, job) {
    tr.className = "row-" + job.state + (tr.classList.contains("row-new") ? " row-new" : "");
    var badge = tr.querySelector('[data-field="state"]');
    badge.className = "badge state-" + job.state;
    badge.textContent = job.state + (job.cancel_requested && job.state === "running" ? " \u00b7 cancelling" : "");
    tr.querySelector('[data-field="phase"]').textContent = SG.phaseText(job);
    var pct = Number(job.percent || 0);
    var bar = tr.querySelector('[data-field="progress"]');
    bar.value = pct;
    tr.querySelector('[data-field="percent"]').textContent = Math.round(pct) + "%";
    tr.querySelector('[data-field="eta"]').textContent =
      job.state === "running" && job.eta_s ? SG.duration(job.eta_s) : "\u2014";
  }

  function newRow(job) {
    var tpl = document.getElementById("row-template");
    var tr = tpl.content.firstElementChild.cloneNode(true);
    tr.dataset.jobId = job.id;
    var link = tr.querySelector("a");
    link.href = "/ui/jobs/" + job.id;
    link.textContent = job.id.slice(0, 8);
    var model = tr.querySelector(".model");
    model.textContent = job.model_id;
    model.title = job.model_id;
    tr.querySelector('[data-field="target"]').textContent =
      job.target_ratio === null || job.target_ratio === undefined ? "\u2014" : Math.round(job.target_ratio * 100) + "%";
    tr.querySelector('[data-field="submitted"]').textContent =
      keyNames[job.submitted_by] || job.submitted_by || "\u2014";
    var time = tr.querySelector("time");
    time.setAttribute("datetime", job.created_at);
    time.textContent = SG.ago(job.created_at);
    var empty = body.querySelector("tr.empty");
    if (empty) empty.remove();
    body.insertBefore(tr, body.firstElementChild);
    var rows = body.querySelectorAll("tr[data-job-id]");
    if (rows.length > perPage) rows[rows.length - 1].remove();
    var pager = document.getElementById("pager-text");
    if (pager) {
      var total = Number(pager.dataset.total || 0) + 1;
      pager.dataset.total = total;
      pager.textContent = total + " job" + (total === 1 ? "" : "s") + " \u00b7 page " + page +
        " of " + Math.max(1, Math.ceil(total / perPage));
    }
    return tr;
  }

  function banner() {
    var el = document.getElementById("new-jobs-banner");
    if (!el) {
      el = document.createElement("p");
      el.id = "new-jobs-banner";
      el.className = "banner";
      table.parentNode.insertBefore(el, table);
    }
    el.textContent = "";
    var a = document.createElement("a");
    a.href = "/ui/jobs";
    a.textContent = newElsewhere + " new job" + (newElsewhere === 1 ? "" : "s") + " \u2014 show the newest";
    el.appendChild(a);
  }

  var countsTimer = null;
  function refreshCounts() {
    if (countsTimer) return;
    countsTimer = setTimeout(function () {
      countsTimer = null;
      fetch("/ui/counts", { credentials: "same-origin" }).then(function (r) {
        return r.ok ? r.json() : null;
      }).then(function (counts) {
        if (!counts) return;
        Object.keys(counts).forEach(function (state) {
          var el = document.querySelector('[data-count="' + state + '"] .n');
          if (el) el.textContent = counts[state];
        });
      }).catch(function () {});
    }, 500);
  }

  var apply = SG.batcher(function (batch) {
    batch.forEach(function (job, id) {
      var tr = body.querySelector('tr[data-job-id="' + id + '"]');
      if (!tr) {
        if (known.has(id)) return;
        known.set(id, job.state);
        if (!isNewer(job) || !matches(job)) return;
        if (page !== 1) { newElsewhere += 1; banner(); return; }
        tr = newRow(job);
      }
      fill(tr, job);
    });
  });

  SG.stream(streamEl.dataset.url, function (ev) {
    var job = ev.job;
    var before = known.get(job.id);
    if (before !== job.state) refreshCounts();
    if (before !== undefined) known.set(job.id, job.state);
    apply(job.id, job);
  });
})();
