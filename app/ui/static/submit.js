/* Submit form: builds the POST /v1/jobs body from the fields, sends it with the session's
   CSRF token, and shows the API's 4xx messages next to the fields they are about. */
(function () {
  "use strict";
  var form = document.getElementById("submit-form");
  if (!form) return;
  var NUMERIC = ["target_ratio", "calibration.num_samples", "calibration.seq_len", "calibration.seed",
                 "pruning.percdamp", "pruning.min_group"];
  var box = document.getElementById("form-errors");
  var button = document.getElementById("submit-button");

  function setPath(obj, path, value) {
    var parts = path.split("."), node = obj;
    for (var i = 0; i < parts.length - 1; i++) {
      if (typeof node[parts[i]] !== "object" || node[parts[i]] === null || Array.isArray(node[parts[i]])) node[parts[i]] = {};
      node = node[parts[i]];
    }
    node[parts[parts.length - 1]] = value;
  }

  function clearErrors() {
    box.hidden = true;
    box.textContent = "";
    form.querySelectorAll(".field.invalid").forEach(function (f) {
      f.classList.remove("invalid");
      f.querySelector(".field-error").textContent = "";
    });
  }

  function fieldFor(path) {
    var parts = path.split(".");
    while (parts.length) {
      var f = form.querySelector('[data-field-for="' + parts.join(".") + '"]');
      if (f) return f;
      parts.pop();
    }
    return null;
  }

  function showError(path, message) {
    var f = path ? fieldFor(path) : null;
    if (f) {
      f.classList.add("invalid");
      var e = f.querySelector(".field-error");
      e.textContent = e.textContent ? e.textContent + "; " + message : message;
      return;
    }
    var p = document.createElement("p");
    p.textContent = path ? path + ": " + message : message;
    box.appendChild(p);
    box.hidden = false;
  }

  function showResponse(status, data) {
    if (data && Array.isArray(data.errors) && data.errors.length) {
      data.errors.forEach(function (e) {
        // RFC 9457 problem details: `pointer` is a JSON pointer into the body ("#/a/b").
        var loc = (e.pointer || "#").replace(/^#\/?/, "").split("/").join(".");
        showError(loc, e.detail || "invalid");
      });
    } else if (data && typeof data.detail === "string") {
      // Route-level 4xx say "<field path>: message" or "<field path> needs ...".
      data.detail.split("; ").forEach(function (part) {
        var m = /^([A-Za-z_][\w.]*)(: | )(.+)$/.exec(part);
        if (m && form.querySelector('[data-field-for="' + m[1] + '"]')) {
          showError(m[1], m[2] === ": " ? m[3] : part);
        } else {
          showError(null, part);
        }
      });
    } else {
      showError(null, "The server answered " + status + ".");
    }
    var first = form.querySelector(".field.invalid input, .field.invalid select, .field.invalid textarea");
    if (first) first.focus(); else if (!box.hidden) box.scrollIntoView({ block: "center" });
  }

  function build() {
    var body = {};
    var adv = form.elements.namedItem("advanced").value.trim();
    if (adv) {
      try { body = JSON.parse(adv); } catch (err) { showError("advanced", "not valid JSON: " + err.message); return null; }
      if (typeof body !== "object" || body === null || Array.isArray(body)) { showError("advanced", "must be a JSON object"); return null; }
    }
    Array.prototype.forEach.call(form.elements, function (input) {
      if (!input.name || input.name === "advanced") return;
      var value;
      if (input.type === "checkbox") value = input.checked;
      else {
        value = input.value.trim();
        if (value === "") return;  // the API's default
        if (NUMERIC.indexOf(input.name) >= 0 && /^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(value)) value = Number(value);
      }
      setPath(body, input.name, value);
    });
    return body;
  }

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    clearErrors();
    var body = build();
    if (!body) return;
    button.disabled = true;
    fetch("/ui/jobs", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": SG.csrf(),
                 "Idempotency-Key": form.dataset.idempotencyKey },
      body: JSON.stringify(body)
    }).then(function (r) {
      return r.json().catch(function () { return null; }).then(function (data) {
        if (r.status === 202 && data && data.url) { window.location.assign(data.url); return; }
        if (r.status === 401) { window.location.assign("/ui/login?next=/ui/submit"); return; }
        showResponse(r.status, data);
        button.disabled = false;
      });
    }).catch(function () {
      showError(null, "The service could not be reached; try again.");
      button.disabled = false;
    });
  });
})();
