/* The lobby card of the instance page: follows the topic lobby:<instance> on the live
   socket (owner and lab managers only; checked by the server) and reloads a room's board
   (htmx) when the server says it changed, and all of them after every (re)subscription. */
(function () {
  "use strict";
  var name = document.currentScript.dataset.instance;
  // live.js and htmx are loaded at the end of the page, after this card.
  document.addEventListener("DOMContentLoaded", function () {
    if (!window.lab || !window.htmx) return;
    follow();
  });

  function follow() {
    document.addEventListener("lab:lobby", function (e) { if (e.detail.instance === name) refresh(e.detail.room); });
    document.addEventListener("lab:subscribed", function (e) { if (e.detail.topic === "lobby:" + name) refresh(); });
    lab.subscribe("lobby:" + name);
  }

  function refresh(room) {
    document.querySelectorAll(".lobby-room").forEach(function (el) {
      if (room === undefined || el.dataset.room === room) htmx.trigger(el, "lobby-changed");
    });
  }

})();
