// Dropping a photo on the search form puts it in the file field; without this script
// the field works as usual.
(function () {
  "use strict";
  const zone = document.getElementById("drop");
  const input = document.getElementById("photo");
  if (!zone || !input) { return; }
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    if (e.dataTransfer && e.dataTransfer.files.length) { input.files = e.dataTransfer.files; }
  });
})();
