/* Queue & fleet page: re-read from the server every 10 s (workers report through heartbeats,
   not through the event stream). */
(function () {
  "use strict";
  var root = document.getElementById("fleet-body");
  if (!root) return;
  SG.setLive("open");
  function refresh() {
    fetch(root.dataset.refreshUrl, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) {
        if (r.redirected && r.url.indexOf("/ui/login") >= 0) { window.location.assign(r.url); return null; }
        SG.setLive(r.ok ? "open" : "offline");
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html === null) return;
        var doc = new DOMParser().parseFromString("<div>" + html + "</div>", "text/html");
        root.replaceChildren.apply(root, Array.from(doc.body.firstElementChild.childNodes));
        SG.refreshTimes(root);
      })
      .catch(function () { SG.setLive("offline"); });
  }
  setInterval(refresh, 10000);
})();
