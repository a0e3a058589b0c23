// Keeps each element marked data-live="URL" current: the console sends the
// element's new HTML (rendered and escaped on the server) as an "update"
// event whenever the servers' state moves. Without JavaScript the page is
// still complete; it just does not move.
"use strict";
(function () {
  for (const el of document.querySelectorAll("[data-live]")) {
    const status = document.getElementById(el.dataset.liveStatus);
    const say = (text) => { if (status) status.textContent = text; };
    const es = new EventSource(el.dataset.live);
    es.addEventListener("open", () => say("Live."));
    es.addEventListener("update", (e) => {
      el.innerHTML = e.data;
      say("Live; updated " + new Date().toLocaleTimeString() + ".");
    });
    es.addEventListener("problem", (e) => say("Servers not answering: " + e.data));
    es.addEventListener("error", () => say("Connection to the console lost; reconnecting…"));
  }
})();
