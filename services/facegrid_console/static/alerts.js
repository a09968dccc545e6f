// Live alerts: the server's event stream (Server-Sent Events) adds each new match event's
// card, rendered by the console, to the top of the list. The browser reconnects by
// itself with the last event's cursor (Last-Event-ID), so none is missed or repeated.
(function () {
  "use strict";
  const list = document.getElementById("events");
  const status = document.getElementById("live-status");
  if (!list || !list.dataset.stream || !window.EventSource) { return; }
  const source = new EventSource(list.dataset.stream);
  let count = 0;
  source.addEventListener("open", () => { status.textContent = "Live: new events appear at the top."; });
  source.addEventListener("match", (message) => {
    const holder = document.createElement("template");
    holder.innerHTML = message.data;
    const card = holder.content.firstElementChild;
    if (!card || document.getElementById(card.id)) { return; }
    list.prepend(card);
    const empty = document.getElementById("no-events");
    if (empty) { empty.remove(); }
    count += 1;
    status.textContent = "Live: " + count + " new event" + (count === 1 ? "" : "s") + " since this page opened.";
  });
  source.addEventListener("problem", (message) => {
    status.textContent = "Live updates stopped: " + message.data;
    source.close();
  });
  source.addEventListener("error", () => {
    status.textContent = source.readyState === EventSource.CLOSED
      ? "Live updates stopped (signed out, or the console is unreachable): reload the page."
      : "Connection lost; reconnecting…";
  });
})();
