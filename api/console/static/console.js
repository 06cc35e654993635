/* TaskVision console: the little behaviour plain HTML lacks. Every page works without it (forms post
   normally); with it: confirmations, shift-click range selection, parallel uploads with a progress bar,
   and drop/paste of an image on the try-it page. No inline script: the CSP forbids it. */
(function () {
  "use strict";

  var csrf = document.body.getAttribute("data-csrf") || "";

  // ---- confirmations: <form data-confirm="..."> ------------------------------------------------
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var message = form.getAttribute && form.getAttribute("data-confirm");
    if (message && !window.confirm(message)) {
      event.preventDefault();
    }
  });

  // ---- image grid: click, shift-click, select page -----------------------------------------------
  function setupGrid() {
    var grid = document.querySelector("[data-grid]");
    var bulk = document.querySelector("[data-bulk]");
    if (!bulk) return;
    var boxes = grid ? Array.prototype.slice.call(grid.querySelectorAll("[data-pick]")) : [];
    var counter = bulk.querySelector("[data-selected-count]");
    var action = bulk.querySelector("[data-bulk-action]");
    var labelSelect = bulk.querySelector("select[name=label_id]");
    var valueInput = bulk.querySelector("input[name=value]");
    var last = null;

    function update() {
      var n = boxes.filter(function (b) { return b.checked; }).length;
      counter.textContent = n + " selected";
    }
    function showFields() {
      var kind = action ? action.value : "";
      if (labelSelect) labelSelect.hidden = !(kind === "set-label" || kind === "remove-label" || kind === "set-value");
      if (labelSelect && kind === "set-value") labelSelect.hidden = labelSelect.options.length <= 1;
      if (valueInput) valueInput.hidden = kind !== "set-value";
    }
    boxes.forEach(function (box, index) {
      box.addEventListener("click", function (event) {
        if (event.shiftKey && last !== null && last !== index) {
          var from = Math.min(last, index), to = Math.max(last, index);
          for (var i = from; i <= to; i++) boxes[i].checked = box.checked;
        }
        last = index;
        update();
      });
      box.addEventListener("change", update);
    });
    var all = bulk.querySelector("[data-select-page]");
    if (all) all.addEventListener("click", function () {
      boxes.forEach(function (b) { b.checked = true; });
      update();
    });
    var none = bulk.querySelector("[data-select-none]");
    if (none) none.addEventListener("click", function () {
      boxes.forEach(function (b) { b.checked = false; });
      last = null;
      update();
    });
    if (action) action.addEventListener("change", showFields);
    bulk.addEventListener("submit", function (event) {
      var n = boxes.filter(function (b) { return b.checked; }).length;
      if (n === 0) {
        event.preventDefault();
        counter.textContent = "Select at least one image first.";
        return;
      }
      if (action && action.value === "delete" && !window.confirm("Delete " + n + " image(s)? They leave every task.")) {
        event.preventDefault();
      }
    });
    showFields();
    update();
  }

  // ---- drop zones --------------------------------------------------------------------------------
  function dropzone(zone, onFiles) {
    ["dragenter", "dragover"].forEach(function (name) {
      zone.addEventListener(name, function (event) {
        event.preventDefault();
        zone.classList.add("is-over");
      });
    });
    ["dragleave", "drop"].forEach(function (name) {
      zone.addEventListener(name, function () { zone.classList.remove("is-over"); });
    });
    zone.addEventListener("drop", function (event) {
      event.preventDefault();
      if (event.dataTransfer && event.dataTransfer.files.length) onFiles(event.dataTransfer.files);
    });
  }

  // ---- uploads: a few files at a time, one progress bar, one summary -----------------------------
  var PARALLEL = 3;

  function summary(t) {
    var parts = [t.uploaded + " uploaded"];
    if (t.duplicates) parts.push(t.duplicates + (t.duplicates === 1 ? " was" : " were") + " already there");
    if (t.not_images) parts.push(t.not_images + (t.not_images === 1 ? " was not an image" : " were not images"));
    if (t.too_large) parts.push(t.too_large + " too large");
    if (t.failed) parts.push(t.failed + " failed");
    return parts.join(", ");
  }

  function setupUpload() {
    var panel = document.querySelector("[data-upload-url]");
    if (!panel) return;
    var url = panel.getAttribute("data-upload-url");
    var input = panel.querySelector("[data-upload-input]");
    var zone = panel.querySelector("[data-dropzone]");
    var label = panel.querySelector("[data-upload-label]");
    var bar = panel.querySelector("[data-upload-progress]");
    var status = panel.querySelector("[data-upload-status]");
    var done = panel.querySelector("[data-upload-done]");

    function start(fileList) {
      var files = Array.prototype.slice.call(fileList);
      if (!files.length) return;
      var total = files.reduce(function (sum, f) { return sum + f.size; }, 0) || 1;
      var sent = files.map(function () { return 0; });
      var tally = { uploaded: 0, duplicates: 0, not_images: 0, too_large: 0, failed: 0, problems: [] };
      var next = 0, finished = 0;
      bar.hidden = false;
      bar.value = 0;
      done.hidden = true;
      status.textContent = "Uploading " + files.length + " file(s)…";

      function progress() {
        var bytes = sent.reduce(function (a, b) { return a + b; }, 0);
        bar.value = Math.min(1, bytes / total);
        status.textContent = "Uploading: " + finished + " of " + files.length + " file(s) done (" + summary(tally) + ")";
      }
      function finish() {
        bar.value = 1;
        var text = summary(tally) + ".";
        if (tally.problems.length) text += " " + tally.problems.slice(0, 3).join("; ");
        status.textContent = text;
        done.hidden = false;
        input.value = "";
      }
      function sendOne() {
        if (next >= files.length) return;
        var index = next++;
        var file = files[index];
        var form = new FormData();
        form.append("file", file, file.name);
        if (label && label.value) form.append("label_id", label.value);
        var xhr = new XMLHttpRequest();
        xhr.open("POST", url);
        xhr.setRequestHeader("X-CSRF-Token", csrf);
        xhr.upload.addEventListener("progress", function (event) {
          sent[index] = event.loaded * (file.size / (event.total || 1));
          progress();
        });
        xhr.addEventListener("loadend", function () {
          sent[index] = file.size;
          var answer = null;
          try { answer = JSON.parse(xhr.responseText); } catch (e) { answer = null; }
          if (xhr.status === 200 && answer) {
            ["uploaded", "duplicates", "not_images", "too_large", "failed"].forEach(function (k) { tally[k] += answer[k] || 0; });
            tally.problems = tally.problems.concat(answer.problems || []);
          } else {
            tally.failed += 1;
            tally.problems.push(file.name + ": " + ((answer && answer.detail) || ("error " + xhr.status)));
          }
          finished++;
          progress();
          if (finished === files.length) finish(); else sendOne();
        });
        xhr.send(form);
      }
      for (var i = 0; i < Math.min(PARALLEL, files.length); i++) sendOne();
    }

    input.addEventListener("change", function () { start(input.files); });
    if (zone) dropzone(zone, start);
  }

  // ---- try it: drop, paste, preview ------------------------------------------------------------
  function setupTry() {
    var form = document.querySelector("[data-try]");
    if (!form) return;
    var input = form.querySelector("[data-try-file]");
    var preview = form.querySelector("[data-try-preview]");
    var name = form.querySelector("[data-try-name]");
    var url = form.querySelector("input[name=url]");
    var zone = form.querySelector("[data-dropzone]");

    function show(file) {
      if (preview.src) URL.revokeObjectURL(preview.src);
      preview.src = URL.createObjectURL(file);
      preview.hidden = false;
      name.textContent = file.name || "pasted image";
    }
    function useFile(file) {
      if (!file || !/^image\//.test(file.type)) return false;
      var transfer = new DataTransfer();
      transfer.items.add(file);
      input.files = transfer.files;
      if (url) url.value = "";
      show(file);
      return true;
    }
    input.addEventListener("change", function () { if (input.files.length) show(input.files[0]); });
    if (zone) dropzone(zone, function (files) { useFile(files[0]); });
    document.addEventListener("paste", function (event) {
      var data = event.clipboardData;
      if (!data) return;
      for (var i = 0; i < data.items.length; i++) {
        if (data.items[i].kind === "file" && useFile(data.items[i].getAsFile())) {
          event.preventDefault();
          return;
        }
      }
      var text = (data.getData("text") || "").trim();
      if (/^https?:\/\//i.test(text) && document.activeElement !== url) {
        url.value = text;
        event.preventDefault();
      }
    });
  }

  // ---- review: keys for accept, skip and the labels ([data-key] buttons and links) ----------------
  function setupReview() {
    var body = document.querySelector("[data-review]");
    if (!body) return;
    document.addEventListener("keydown", function (event) {
      if (event.ctrlKey || event.metaKey || event.altKey || event.defaultPrevented) return;
      var target = event.target;
      if (target && /^(INPUT|SELECT|TEXTAREA)$/.test(target.tagName)) return;
      var key = (event.key || "").toLowerCase();
      var control = body.querySelector('[data-key="' + key + '"]');
      if (!control || control.disabled) return;
      event.preventDefault();
      control.click();
    });
  }

  function init() {
    setupReview();
    setupGrid();
    setupUpload();
    setupTry();
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init); else init();
})();
