// The status page follows the catalog: /live says that something changed, and the
// page fetches its own live part again (rendered and escaped by the server).
"use strict";
(() => {
  const live = document.getElementById("live");
  const status = document.getElementById("live-status");
  if (!live || !window.EventSource) return;
  const say = (text) => { if (status) status.textContent = text; };
  let timer = null;
  const refresh = async () => {
    timer = null;
    const r = await fetch(location.href, {headers: {"X-Live-Fragment": "1"},
                                          credentials: "same-origin", redirect: "manual"});
    if (r.status !== 200) { location.reload(); return; }  // logged out: the login page
    live.innerHTML = await r.text();
    say("live · updated " + new Date().toLocaleTimeString());
    pending();
  };
  // A part the server is still working out (the store's survey) is asked for again.
  const pending = () => {
    if (!timer && live.querySelector("[data-pending]")) timer = setTimeout(refresh, 2000);
  };
  pending();
  const stream = new EventSource(live.dataset.stream);
  stream.addEventListener("change", () => { if (!timer) timer = setTimeout(refresh, 200); });
  stream.addEventListener("end", () => { stream.close(); location.reload(); });
  stream.onopen = () => say("live");
  stream.onerror = () => say("live · reconnecting…");
})();
