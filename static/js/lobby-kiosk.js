/* A kiosk seat page. Shows one of three views (welcome with "I am ready", "please wait",
   "taking you to the session"); a websocket tells it its seat's state, the gate, when to
   go to the room and when it was reset. It reconnects by itself (manager restart, network
   blip) and then shows the state the server reports. "I am ready" is a CSRF-checked POST;
   without JavaScript the same form works as a plain form. */
(function () {
  "use strict";
  var root = document.getElementById("kiosk");
  var statusEl = document.getElementById("kiosk-status");
  var form = document.getElementById("ready-form");
  var button = document.getElementById("ready-button");
  var views = {welcome: "view-welcome", wait: "view-wait", going: "view-going"};
  var current = root.dataset.state === "ready" ? "wait" : "welcome";
  var socket = null, attempt = 0, pinger = null, leaving = false;

  function show(name) {
    current = name;
    Object.keys(views).forEach(function (key) { document.getElementById(views[key]).hidden = key !== name; });
    button.disabled = false;
  }

  function status(text) {
    statusEl.textContent = text || "";
    statusEl.hidden = !text;
  }

  function go(url) {
    if (!/^https?:\/\//.test(url || "")) return;
    leaving = true;
    show("going");
    window.location.assign(url);
  }

  function onState(event) {
    if (event.seat === "ready") show("wait");
    else if (event.seat === "entered" && current === "wait" && event.url) go(event.url);  // the gate opened while away
    else if (current !== "going") show("welcome");
  }

  function connect() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + location.host + root.dataset.ws + "?label=" + encodeURIComponent(root.dataset.label));
    socket.onopen = function () {
      attempt = 0;
      status("");
      pinger = setInterval(function () { if (socket.readyState === 1) socket.send('{"type": "ping"}'); }, 10000);
    };
    socket.onmessage = function (msg) {
      var event;
      try { event = JSON.parse(msg.data); } catch (e) { return; }
      if (event.type === "go") go(event.url);
      else if (event.type === "state") onState(event);
      else if (event.type === "gate" && event.gate === "open" && current === "wait") ready(0);  // ask: in now?
      document.dispatchEvent(new CustomEvent("kiosk:" + event.type, {detail: event}));
    };
    socket.onclose = function () {
      clearInterval(pinger);
      if (leaving) return;
      status(root.dataset.reconnecting);
      attempt += 1;
      var delay = Math.min(5000, 250 * Math.pow(2, Math.min(attempt, 5))) * (0.5 + Math.random() / 2);
      setTimeout(connect, delay);
    };
  }

  function ready(tries) {
    button.disabled = true;
    var token = form.querySelector("input[name=csrfmiddlewaretoken]").value;
    fetch(form.action, {method: "POST", credentials: "same-origin",
                        headers: {"X-CSRFToken": token, "Accept": "application/json"}})
      .then(function (response) {
        if (response.status >= 400 && response.status < 500) { window.location.reload(); return null; }
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      })
      .then(function (data) {
        if (!data) return;
        status("");
        if (data.state === "entered") go(data.url);
        else show("wait");
      })
      .catch(function () {
        // The manager is restarting or the network is gone: try again for a while.
        status(root.dataset.retrying);
        if (tries < 60) setTimeout(function () { ready(tries + 1); }, 1000);
        else { status(""); button.disabled = false; }
      });
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (!button.disabled) ready(0);
  });
  show(current);
  connect();
})();
