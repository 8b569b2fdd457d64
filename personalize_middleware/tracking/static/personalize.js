/* personalize-middleware tracking script.
 * Impressions: an element with data-pz-impression counts once it has been at least 50%
 * visible for 1 continuous second while the tab is visible; at most once per element and
 * page view (a back/forward-cache restore continues the same page view).
 * Clicks: a click on (or inside) an element with data-pz-click reports that element once.
 * Beacons: the signed tokens, batched per animation frame, POSTed with sendBeacon (or
 * fetch keepalive) to the URL in this script tag's data-pz-endpoint. A hook may hold
 * "<render id>~<index>" into its page view's manifest (data-pz-page on this tag, or on
 * a <template> after a fragment's hooks): one beacon per page view, its manifest sent
 * along as "page". Each batch sent is announced as a "personalize:sent" event on
 * document (detail.tokens, an index written out as the token it stands for), for the
 * overlay.
 * No eval, no inline code, no third-party code: it runs under a strict CSP. */
(function () {
  "use strict";
  var script = document.currentScript;
  var endpoint = script && script.getAttribute("data-pz-endpoint");
  if (!endpoint || window.__personalizeTracking) {
    return;
  }
  window.__personalizeTracking = true;

  var IMPRESSION = "data-pz-impression";
  var CLICK = "data-pz-click";
  var PAGE = "data-pz-page";
  var DWELL_MS = 1000;
  var RATIO = 0.5;
  var MAX_PER_BEACON = 25;

  var queue = [];
  var frame = 0;
  var reported = new WeakSet();
  var clicked = new WeakSet();
  var observed = new WeakSet();
  var inView = new Set();
  var timers = new Map();

  function post(body) {
    try {
      if (navigator.sendBeacon &&
          navigator.sendBeacon(endpoint, new Blob([body], {type: "application/json"}))) {
        return;
      }
    } catch (e) { /* fall through to fetch */ }
    if (window.fetch) {
      fetch(endpoint, {
        method: "POST", body: body, keepalive: true, credentials: "same-origin",
        headers: {"Content-Type": "application/json"}
      }).catch(function () {});
    }
  }

  function flush() {
    if (frame) {
      cancelAnimationFrame(frame);
      frame = 0;
    }
    // One beacon per page view: an index means something only with its own manifest.
    var groups = Object.create(null);
    var order = [];
    queue.splice(0, queue.length).forEach(function (token) {
      var at = token.indexOf("~");
      var view = at > 0 ? token.slice(0, at) : "";
      if (!groups[view]) {
        groups[view] = [];
        order.push(view);
      }
      groups[view].push(token);
    });
    order.forEach(function (view) {
      var manifest = view ? pageManifest(view) : null;
      if (view && !manifest) {
        return;  // no manifest for these hooks on this page: nothing verifiable to send
      }
      var tokens = groups[view];
      while (tokens.length) {
        var batch = tokens.splice(0, MAX_PER_BEACON);
        var body = {events: batch};
        if (manifest) {
          body.page = manifest;
        }
        post(JSON.stringify(body));
        announce(batch, manifest);
      }
    });
  }

  // The last manifest of page view `view` in the document (one written later lists
  // more of its hooks); a manifest is "<parts>.<render id>.<expiry>.<elements>.<sig>".
  function pageManifest(view) {
    var found = null;
    var tags = document.querySelectorAll("[" + PAGE + "]");
    for (var i = 0; i < tags.length; i++) {
      var manifest = tags[i].getAttribute(PAGE) || "";
      if (manifest.split(".")[1] === view) {
        found = manifest;
      }
    }
    return found;
  }

  // "<render id>~3" written out as the token it stands for (the signature left out).
  function expand(token, manifest) {
    var fields = manifest ? manifest.split(".") : [];
    var index = +token.slice(token.indexOf("~") + 1);
    var element = fields.length === 5 ? fields[3].split("~")[index] : null;
    var found = element ? /^([0-9]+)(.*)$/.exec(element) : null;
    if (!found) {
      return token;
    }
    var part = fields[0].split("~")[+found[1]];
    return [part, fields[1], fields[2], found[2], "~"].join(".");
  }

  // For the debug overlay (and the app's own scripts): what this page view sent.
  function announce(tokens, manifest) {
    var shown = tokens.map(function (token) {
      return token.indexOf("~") > 0 ? expand(token, manifest) : token;
    });
    try {
      document.dispatchEvent(new CustomEvent("personalize:sent", {detail: {tokens: shown}}));
    } catch (e) { /* no CustomEvent: nobody to tell */ }
  }

  function enqueue(token) {
    queue.push(token);
    if (document.visibilityState !== "visible") {
      flush();  // no animation frames in a hidden tab
    } else if (!frame) {
      frame = requestAnimationFrame(function () { frame = 0; flush(); });
    }
  }

  function report(el) {
    if (reported.has(el)) {
      return;
    }
    reported.add(el);
    inView.delete(el);
    if (observer) {
      observer.unobserve(el);
    }
    var token = el.getAttribute(IMPRESSION);
    if (token) {
      enqueue(token);
    }
  }

  function startTimer(el) {
    if (reported.has(el) || timers.has(el) || document.visibilityState !== "visible") {
      return;
    }
    timers.set(el, setTimeout(function () {
      timers.delete(el);
      if (inView.has(el) && document.visibilityState === "visible") {
        report(el);
      }
    }, DWELL_MS));
  }

  function stopTimer(el) {
    var timer = timers.get(el);
    if (timer !== undefined) {
      clearTimeout(timer);
      timers.delete(el);
    }
  }

  function stopAll() {
    timers.forEach(function (timer) { clearTimeout(timer); });
    timers.clear();
  }

  var observer = window.IntersectionObserver ? new IntersectionObserver(function (entries) {
    entries.forEach(function (entry) {
      var el = entry.target;
      // A threshold crossing can report a hair under the threshold itself.
      if (entry.isIntersecting && entry.intersectionRatio >= RATIO - 0.001) {
        inView.add(el);
        startTimer(el);
      } else {
        inView.delete(el);
        stopTimer(el);
      }
    });
  }, {threshold: [0, RATIO, 1]}) : null;

  function watch(el) {
    if (observer && !observed.has(el)) {
      observed.add(el);
      observer.observe(el);
    }
  }

  function scan(root) {
    if (root.nodeType !== 1) {
      return;
    }
    if (root.hasAttribute(IMPRESSION)) {
      watch(root);
    }
    var found = root.querySelectorAll("[" + IMPRESSION + "]");
    for (var i = 0; i < found.length; i++) {
      watch(found[i]);
    }
  }

  document.addEventListener("click", function (event) {
    var target = event.target;
    if (target && target.nodeType !== 1) {
      target = target.parentElement;
    }
    var el = target && target.closest ? target.closest("[" + CLICK + "]") : null;
    if (!el || clicked.has(el)) {
      return;
    }
    clicked.add(el);
    var token = el.getAttribute(CLICK);
    if (token) {
      enqueue(token);
    }
  }, true);

  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible") {
      inView.forEach(startTimer);
    } else {
      stopAll();  // the second must be continuous and in a visible tab
      flush();
    }
  });
  window.addEventListener("pagehide", function () {
    stopAll();
    flush();
  });
  window.addEventListener("pageshow", function (event) {
    if (event.persisted) {
      inView.forEach(startTimer);  // restored from the bfcache: same page view
    }
  });

  scan(document.documentElement);
  if (window.MutationObserver) {
    new MutationObserver(function (records) {
      records.forEach(function (record) {
        record.addedNodes.forEach(scan);
      });
    }).observe(document.documentElement, {childList: true, subtree: true});
  }
})();
