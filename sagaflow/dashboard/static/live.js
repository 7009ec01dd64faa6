// Live updates without a page reload: every data-refresh seconds, fetch this
// page's live fragment (X-Sagaflow-Live: 1) and swap it in. Skipped while the
// operator is typing in it; pages read the same without this script.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !window.fetch) { return; }
  var seconds = parseFloat(live.getAttribute("data-refresh")) || 2;
  function busy() {
    if (live.contains(document.activeElement) && document.activeElement !== document.body) {
      return true;
    }
    var inputs = live.querySelectorAll("input:not([type=hidden])");
    for (var i = 0; i < inputs.length; i++) {
      if (inputs[i].value !== inputs[i].defaultValue) { return true; }
    }
    return false;
  }
  function refresh() {
    if (document.hidden || busy()) { return schedule(); }
    fetch(window.location.href, { headers: { "X-Sagaflow-Live": "1" }, credentials: "same-origin" })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (html !== null && !busy()) {
          live.innerHTML = html;
          live.setAttribute("data-updated", String(Date.now()));
        }
      })
      .catch(function () { /* the next tick tries again */ })
      .then(schedule);
  }
  function schedule() { window.setTimeout(refresh, seconds * 1000); }
  schedule();
})();
