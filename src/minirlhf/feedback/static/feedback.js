// Keyboard shortcuts: a key presses the button whose data-key it is (a, b, t, s, u).
// One submit per page: a double click or a held key must not send a second choice.
(function () {
  "use strict";
  var sent = false;

  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    var tag = e.target && e.target.tagName;
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") return;
    var button = document.querySelector('button[data-key="' + e.key.toLowerCase() + '"]');
    if (button && !button.disabled) {
      e.preventDefault();
      button.click();
    }
  });

  document.addEventListener("submit", function (e) {
    if (sent) {
      e.preventDefault();
      return;
    }
    sent = true;
    document.body.classList.add("sending");
  });

  // The admin's new link: selected on focus, ready to copy.
  var link = document.getElementById("new-link");
  if (link) {
    link.addEventListener("focus", function () { link.select(); });
    link.focus();
  }
})();
