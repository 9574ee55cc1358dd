// rlhfkit feedback app: progressive enhancements only; every form also works without JavaScript.
// Ranking: the places start empty; drag and drop, Alt+Up/Down, up/down buttons, "Rank as shown" and
// "ties with the one above" fill the place numbers (the submitted values) from the cards' order, and a
// warning says live where the ranking contradicts the ratings (the server asks again before saving it).
// A/B: the a / t / b keys. Demonstration: Ctrl+Enter submits.
"use strict";

function typingIn(element) {
  return element && (element.tagName === "TEXTAREA" || element.tagName === "SELECT" ||
    (element.tagName === "INPUT" && !["checkbox", "radio", "button", "submit"].includes(element.type)));
}

function setUpRanking(list) {
  const form = list.closest("form");
  const cards = () => Array.from(list.querySelectorAll(".rank-card"));
  const place = (card) => card.querySelector("[data-rank-input]");
  const placed = (card) => place(card).value.trim() !== "";
  const tie = (card) => card.querySelector("[data-tie]");
  const letter = (card) => card.dataset.letter;
  const rating = (card) => {
    const checked = card.querySelector(".rating input:checked");
    return checked ? Number(checked.value) : null;
  };

  // Where a higher-rated output is ranked below a lower-rated one: a warning, never a block.
  function warnOfContradictions() {
    const warning = form.querySelector("[data-contradiction-warning]");
    const rated = cards().filter((card) => placed(card) && rating(card) !== null);
    const messages = [];
    rated.forEach((high) => rated.forEach((low) => {
      if (rating(high) > rating(low) && Number(place(high).value) > Number(place(low).value)) {
        messages.push(`output ${letter(high)} is rated ${rating(high)} but ranked below output ${letter(low)}, ` +
          `rated ${rating(low)}`);
      }
    }));
    warning.hidden = messages.length === 0;
    warning.textContent = messages.length ? `Your ranking contradicts your ratings: ${messages.join("; ")}.` : "";
  }

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
    warnOfContradictions();
  }

  // The order and tie boxes from the place numbers (typed in, or given back by the server); unplaced
  // cards stay below, in the order shown, and tie with nothing.
  function reorderByPlace() {
    const sorted = cards().map((card, position) => ({ card, position, value: Number(place(card).value) || 1e9 }))
      .sort((a, b) => a.value - b.value || a.position - b.position);
    sorted.forEach(({ card }, position) => {
      list.appendChild(card);
      const above = position > 0 ? sorted[position - 1].card : null;
      tie(card).checked = above !== null && placed(card) && placed(above) &&
        Number(place(card).value) === Number(place(above).value);
      tie(card).disabled = position === 0;
    });
    warnOfContradictions();
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
      event.dataTransfer.setData("text/plain", card.dataset.position);
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
    card.querySelectorAll(".rating input").forEach((input) => input.addEventListener("change", warnOfContradictions));
  });
  form.querySelector("[data-rank-as-shown]").addEventListener("click", renumber);
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
