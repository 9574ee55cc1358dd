// rlhfkit feedback app: progressive enhancements only; every form also works without JavaScript.
// Ranking: drag and drop, Alt+Up/Down, up/down buttons and "ties with the one above" keep the place
// numbers (the submitted values) in step with the cards' order. A/B: the a / t / b keys. Demonstration:
// Ctrl+Enter submits.
"use strict";

function typingIn(element) {
  return element && (element.tagName === "TEXTAREA" || element.tagName === "SELECT" ||
    (element.tagName === "INPUT" && !["checkbox", "radio", "button", "submit"].includes(element.type)));
}

function setUpRanking(list) {
  const cards = () => Array.from(list.querySelectorAll(".rank-card"));
  const place = (card) => card.querySelector("[data-rank-input]");
  const tie = (card) => card.querySelector("[data-tie]");

  // The place numbers from the order and the tie boxes: 1, then +1 unless tied with the card above.
  function renumber() {
    let current = 0;
    cards().forEach((card, position) => {
      const tied = position > 0 && tie(card).checked;
      if (!tied) current = position + 1;
      place(card).value = current;
      tie(card).disabled = position === 0;
      if (position === 0) tie(card).checked = false;
    });
  }

  // The order and tie boxes from the place numbers (when a number is typed in).
  function reorderByPlace() {
    const sorted = cards().map((card, position) => ({ card, position, value: Number(place(card).value) || 1e9 }))
      .sort((a, b) => a.value - b.value || a.position - b.position);
    sorted.forEach(({ card }, position) => {
      list.appendChild(card);
      tie(card).checked = position > 0 && Number(place(card).value) === Number(place(sorted[position - 1].card).value);
      tie(card).disabled = position === 0;
    });
  }

  function move(card, step) {
    const all = cards();
    const target = all.indexOf(card) + step;
    if (target < 0 || target >= all.length) return;
    tie(card).checked = false;
    if (step < 0) list.insertBefore(card, all[target]);
    else list.insertBefore(card, all[target].nextSibling);
    renumber();
    card.focus();
  }

  let dragged = null;
  cards().forEach((card) => {
    card.addEventListener("dragstart", (event) => {
      dragged = card;
      card.classList.add("dragging");
      event.dataTransfer.effectAllowed = "move";
      event.dataTransfer.setData("text/plain", card.dataset.index);
    });
    card.addEventListener("dragend", () => {
      card.classList.remove("dragging");
      cards().forEach((other) => other.classList.remove("drop-target"));
      dragged = null;
    });
    card.addEventListener("dragover", (event) => {
      if (!dragged || dragged === card) return;
      event.preventDefault();
      card.classList.add("drop-target");
    });
    card.addEventListener("dragleave", () => card.classList.remove("drop-target"));
    card.addEventListener("drop", (event) => {
      event.preventDefault();
      card.classList.remove("drop-target");
      if (!dragged || dragged === card) return;
      const all = cards();
      const before = all.indexOf(dragged) > all.indexOf(card);  // moving up: land above the target
      list.insertBefore(dragged, before ? card : card.nextSibling);
      tie(dragged).checked = false;
      renumber();
    });
    card.addEventListener("keydown", (event) => {
      if (event.target !== card || !event.altKey) return;
      if (event.key === "ArrowUp") { event.preventDefault(); move(card, -1); }
      if (event.key === "ArrowDown") { event.preventDefault(); move(card, 1); }
    });
    card.querySelectorAll("[data-move]").forEach((button) =>
      button.addEventListener("click", () => move(card, Number(button.dataset.move))));
    tie(card).addEventListener("change", renumber);
    place(card).addEventListener("change", reorderByPlace);
  });
  reorderByPlace();
}

function setUpVerdictKeys(form) {
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.altKey || event.metaKey || typingIn(event.target)) return;
    const button = form.querySelector(`[data-key="${event.key.toLowerCase()}"]`);
    if (button) { event.preventDefault(); button.click(); }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-rank-list]").forEach(setUpRanking);
  document.querySelectorAll(".ab-form").forEach(setUpVerdictKeys);
  document.querySelectorAll("[data-submit-on-ctrl-enter]").forEach((area) =>
    area.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); area.form.requestSubmit(); }
    }));
});
