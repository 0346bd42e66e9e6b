// Live refresh: every few seconds, fetch this page's live block and swap it in place.
// No reload, no framework; a failed fetch marks the page stale and the next one retries.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var state = document.getElementById("live-state");
  if (!live) { return; }
  var period = parseFloat(live.getAttribute("data-refresh") || "2") * 1000;
  if (!(period > 0)) { return; }
  var busy = false;

  function mark(ok, text) {
    if (!state) { return; }
    state.className = "live-state " + (ok ? "ok" : "stale");
    state.title = text;
  }

  function refresh() {
    if (busy || document.hidden) { return; }
    var focused = document.activeElement;
    if (focused && focused !== document.body && live.contains(focused) && focused.tagName !== "A") {
      return; // the user is using a form in the page: do not swap it away
    }
    busy = true;
    fetch(window.location.href, {
      headers: { "X-Omniq-Fragment": "1" },
      credentials: "same-origin",
      cache: "no-store",
      redirect: "error"
    }).then(function (response) {
      if (!response.ok) { throw new Error("HTTP " + response.status); }
      return response.text();
    }).then(function (html) {
      live.innerHTML = html;
      live.setAttribute("data-refreshed", String(Date.now()));
      mark(true, "live: refreshed " + new Date().toLocaleTimeString());
    }).catch(function (error) {
      mark(false, "refresh failed: " + error.message);
    }).then(function () { busy = false; });
  }

  mark(true, "live");
  window.setInterval(refresh, period);
}());
