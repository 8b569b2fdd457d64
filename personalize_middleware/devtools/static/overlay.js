/* personalize-middleware debug overlay (local mode, QA cookies, or overlay for everyone).
 * Reads the JSON data island the server rendered (#pz-overlay-data), builds the panel with
 * textContent only (never innerHTML), sets no inline style (classes of devtools.css), and
 * counts the impressions and clicks the tracking script sends from this page view (its
 * "personalize:sent" events). No eval, no inline code: it runs under a strict CSP. */
(function () {
  "use strict";
  var island = document.getElementById("pz-overlay-data");
  if (!island || window.__personalizeOverlay) {
    return;
  }
  window.__personalizeOverlay = true;
  var data;
  try {
    data = JSON.parse(island.textContent || "{}");
  } catch (e) {
    return;
  }
  var rows = data.experiences || [];
  var byPart = {};  // a tracking token's experience part -> that row's counters
  var STORAGE = "pz-overlay-collapsed";

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) {
      node.className = className;
    }
    if (text !== undefined && text !== null) {
      node.textContent = String(text);
    }
    return node;
  }

  function amount(value, unit) {
    return value === null || value === undefined ? "\u2013" : (Math.round(value * 10) / 10) + unit;
  }

  function plural(count, word) {
    return count + " " + word + (count === 1 ? "" : "s");
  }

  var panel = el("aside", "pz-overlay");
  panel.id = "pz-overlay";
  panel.setAttribute("aria-label", "Personalization debug overlay");
  var head = el("div", "pz-overlay-head");
  var toggle = el("button", "pz-overlay-toggle", "personalize \u00b7 " + plural(rows.length, "experience"));
  toggle.type = "button";
  head.appendChild(toggle);
  var meta = ["waited " + amount(data.waited_ms, " ms")];
  if (data.preview) {
    meta.push("preview: " + data.preview);
  }
  if (data.qa) {
    meta.push("QA: " + data.qa);
  }
  if (!data.tracking) {
    meta.push("tracking off");
  }
  head.appendChild(el("span", "pz-overlay-meta", meta.join(" \u00b7 ")));
  panel.appendChild(head);

  var body = el("div", "pz-overlay-body");
  var table = el("table", "pz-overlay-table");
  var headRow = el("tr");
  ["key", "variation", "audience", "source", "fetch", "age", "sent"].forEach(function (name) {
    headRow.appendChild(el("th", null, name));
  });
  table.appendChild(el("thead")).appendChild(headRow);
  var tbody = table.appendChild(el("tbody"));
  rows.forEach(function (row) {
    var tr = el("tr", "pz-row pz-src-" + String(row.source).replace(/[^a-z_]/g, ""));
    tr.setAttribute("data-key", row.key);
    tr.appendChild(el("td", "pz-key", row.key));
    tr.appendChild(el("td", "pz-variation", row.variation || "\u2013"));
    tr.appendChild(el("td", "pz-audience", row.audience || "\u2013"));
    tr.appendChild(el("td", "pz-source", row.reason ? row.source + ": " + row.reason : row.source));
    tr.appendChild(el("td", "pz-fetch", amount(row.fetch_ms, " ms")));
    tr.appendChild(el("td", "pz-age", amount(row.age, " s")));
    var sent = tr.appendChild(el("td", "pz-sent", "\u2013"));
    tbody.appendChild(tr);
    if (row.track) {
      byPart[row.track] = {key: row.key, impressions: 0, clicks: 0, cell: sent};
    }
  });
  body.appendChild(table);
  var log = body.appendChild(el("ol", "pz-overlay-log"));
  panel.appendChild(body);

  function text(base64url) {  // a click's b_id: base64url of its UTF-8 bytes
    try {
      var padded = base64url.replace(/-/g, "+").replace(/_/g, "/");
      while (padded.length % 4) {
        padded += "=";
      }
      var binary = atob(padded);
      var bytes = new Uint8Array(binary.length);
      for (var i = 0; i < binary.length; i++) {
        bytes[i] = binary.charCodeAt(i);
      }
      return new TextDecoder().decode(bytes);
    } catch (e) {
      return "?";
    }
  }

  document.addEventListener("personalize:sent", function (event) {
    var tokens = (event.detail && event.detail.tokens) || [];
    tokens.forEach(function (token) {
      var fields = String(token).split(".");
      if (fields.length !== 5) {
        return;
      }
      var counter = byPart[fields[0]];
      var key = counter ? counter.key : "?";
      var line;
      if (fields[3] === "s") {
        line = "impression \u2192 " + key;
        if (counter) {
          counter.impressions += 1;
        }
      } else {
        line = "click \u2192 " + key + ": " + text(fields[3].slice(1));
        if (counter) {
          counter.clicks += 1;
        }
      }
      if (counter) {
        counter.cell.textContent =
          plural(counter.impressions, "impression") + ", " + plural(counter.clicks, "click");
      }
      log.appendChild(el("li", null, line));
    });
  });

  function collapse(flag) {
    panel.classList.toggle("pz-collapsed", flag);
    toggle.setAttribute("aria-expanded", flag ? "false" : "true");
    try {
      sessionStorage.setItem(STORAGE, flag ? "1" : "0");
    } catch (e) { /* storage off: the state just does not persist */ }
  }
  toggle.addEventListener("click", function () {
    collapse(!panel.classList.contains("pz-collapsed"));
  });
  var collapsed = false;
  try {
    collapsed = sessionStorage.getItem(STORAGE) === "1";
  } catch (e) { /* storage off */ }

  function mount() {
    document.body.appendChild(panel);
    collapse(collapsed);
  }
  if (document.body) {
    mount();
  } else {
    document.addEventListener("DOMContentLoaded", mount);
  }
})();
