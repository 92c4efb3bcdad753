/* The realtime socket: one per tab. Shows toasts for "notify" events and re-broadcasts
   every event as a DOM event ("lab:<type>") so pages can react (e.g. htmx refresh). */
(function () {
  "use strict";
  var status = document.getElementById("live-status");
  var toasts = document.getElementById("toasts");
  var attempt = 0;
  var socket = null;
  var topics = [];  // re-subscribed after every reconnect
  var sticky = {};  // messages re-sent after every reconnect (e.g. "follow these logs")

  function setStatus(text, cls) {
    if (!status) return;
    status.textContent = text;
    status.className = "badge rounded-pill " + cls;
  }

  function showToast(event) {
    var level = ["success", "danger", "warning", "info"].indexOf(event.level) >= 0 ? event.level : "info";
    var icon = {success: "check-circle-fill", danger: "x-octagon-fill", warning: "exclamation-triangle-fill", info: "info-circle-fill"}[level];
    var el = document.createElement("div");
    el.className = "toast border-0 border-start border-4 border-" + level;
    el.setAttribute("role", level === "danger" ? "alert" : "status");
    el.dataset.level = level;
    var body = document.createElement("div");
    body.className = "toast-body d-flex align-items-start gap-2";
    var i = document.createElement("i");
    i.className = "bi bi-" + icon + " text-" + level;
    var text = document.createElement("div");
    text.className = "flex-grow-1";
    text.textContent = event.message;  // never innerHTML: messages contain user input
    if (event.link && event.link.charAt(0) === "/") {
      var a = document.createElement("a");
      a.href = event.link;
      a.className = "d-block small mt-1";
      a.textContent = "Open";
      text.appendChild(a);
    }
    var close = document.createElement("button");
    close.type = "button";
    close.className = "btn-close";
    close.setAttribute("data-bs-dismiss", "toast");
    close.setAttribute("aria-label", "Close");
    body.appendChild(i); body.appendChild(text); body.appendChild(close);
    el.appendChild(body);
    toasts.appendChild(el);
    var toast = new bootstrap.Toast(el, {delay: level === "danger" ? 15000 : 8000});
    el.addEventListener("hidden.bs.toast", function () { el.remove(); });
    toast.show();
  }

  // Ids of notifications this tab has shown (kept across its page loads, not across tabs).
  function alreadyShown(id) {
    if (!id) return false;
    var shown = [];
    try { shown = JSON.parse(sessionStorage.getItem("lab:shown") || "[]"); } catch (e) { shown = []; }
    if (shown.indexOf(id) >= 0) return true;
    shown.push(id);
    try { sessionStorage.setItem("lab:shown", JSON.stringify(shown.slice(-50))); } catch (e) { /* private mode */ }
    return false;
  }

  function connect() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + location.host + "/ws/live/");
    socket.onopen = function () { attempt = 0; setStatus("live", "text-bg-success"); };
    socket.onmessage = function (msg) {
      var event;
      try { event = JSON.parse(msg.data); } catch (e) { return; }
      if (event.type === "hello") {
        topics.forEach(function (t) { socket.send(JSON.stringify({subscribe: t})); });
        Object.keys(sticky).forEach(function (k) { socket.send(JSON.stringify(sticky[k])); });
      }
      if (event.type === "notify" && !alreadyShown(event.id)) showToast(event);
      document.dispatchEvent(new CustomEvent("lab:" + event.type, {detail: event}));
      if (event.job && window.htmx) htmx.trigger(document.body, "lab:jobs-changed");
    };
    socket.onclose = function () {
      setStatus("offline – reconnecting", "text-bg-warning");
      attempt += 1;
      var delay = Math.min(30000, 500 * Math.pow(2, Math.min(attempt, 6))) * (0.5 + Math.random() / 2);
      setTimeout(connect, delay);
    };
  }

  window.lab = {
    subscribe: function (topic) {
      if (topics.indexOf(topic) >= 0) return;
      topics.push(topic);
      if (socket && socket.readyState === 1) socket.send(JSON.stringify({subscribe: topic}));
    },
    sticky: function (key, message) {
      sticky[key] = message;
      if (socket && socket.readyState === 1) socket.send(JSON.stringify(message));
    },
    toast: showToast,
  };
  connect();
})();
