// rlhfkit feedback app: progressive enhancements only; every form also works without JavaScript.
// Ranking: the places start empty; drag and drop, Alt+Up/Down, up/down buttons, "Rank as shown" and
// "ties with the one above" fill the place numbers (the submitted values) from the cards' order, and a
// warning says live where the ranking contradicts the ratings (the server asks again before saving it).
// Shortcut keys on the ranking page, for the highlighted output (the one with the focus, clicked last, or
// the first): the digit keys rate it (on the project's scale), each flag's letter (shown beside it) toggles
// it, j / k highlight the next / previous output.
// A/B: the a / t / b keys. Demonstration: Ctrl+Enter submits.
// Drafts: what a labeler enters in an answer form (text, ratings, flags, places) is kept in this browser's
// localStorage, one entry per user and item, as they type; a reload, a server restart or a new login after
// the session ended brings it back. It is dropped when the server confirms the answer (or skip) was stored,
// when the labeler keeps an answer unchanged instead of editing it, and after 14 days.
"use strict";

const DRAFT_PREFIX = "rlhfkit-draft:";
const DRAFT_MAX_AGE_MS = 14 * 24 * 3600 * 1000;
const DRAFT_SAVE_DELAY_MS = 250;

function draftStorage() {
  try {
    return window.localStorage;
  } catch (error) {  // storage disabled: no drafts, everything else works
    return null;
  }
}

function readDraft(storage, key) {
  try {
    const draft = JSON.parse(storage.getItem(key));
    return draft && typeof draft.savedAt === "number" && draft.state ? draft : null;
  } catch (error) {
    return null;
  }
}

function forgetDraft(key) {
  const storage = draftStorage();
  if (storage && key) storage.removeItem(key);
}

function forgetOldDrafts() {
  const storage = draftStorage();
  if (!storage) return;
  const keys = [];
  for (let index = 0; index < storage.length; index += 1) keys.push(storage.key(index));
  keys.filter((key) => key && key.startsWith(DRAFT_PREFIX)).forEach((key) => {
    const draft = readDraft(storage, key);
    if (!draft || Date.now() - draft.savedAt > DRAFT_MAX_AGE_MS) storage.removeItem(key);
  });
}

// The fields a labeler fills in (not the CSRF token or the edit marker; tie boxes follow from the places).
function draftFields(form) {
  return Array.from(form.elements).filter((field) => field.name && field.name !== "csrf_token" &&
    !["hidden", "submit", "button", "file", "password"].includes(field.type));
}

function formState(form) {
  const values = {};
  const checked = [];
  draftFields(form).forEach((field) => {
    if (field.type === "checkbox" || field.type === "radio") {
      if (field.checked) checked.push(`${field.name}=${field.value}`);
    } else {
      values[field.name] = field.value;
    }
  });
  return { values, checked };
}

function applyState(form, state) {
  draftFields(form).forEach((field) => {
    if (field.type === "checkbox" || field.type === "radio") {
      field.checked = Array.isArray(state.checked) && state.checked.includes(`${field.name}=${field.value}`);
    } else if (state.values && Object.prototype.hasOwnProperty.call(state.values, field.name)) {
      field.value = state.values[field.name];
    }
  });
}

// Restore the form's draft (before the ranking is set up, which orders the cards by the restored places)
// and keep it up to date. A page merely opened writes no draft; one that already has a draft keeps it current.
function setUpDraft(form) {
  const storage = draftStorage();
  const key = form.dataset.draft;
  const status = form.querySelector("[data-draft-status]");
  const say = (text) => { if (status) status.textContent = text; };
  if (!storage || !key) return;
  const initial = JSON.stringify(formState(form));
  const draft = readDraft(storage, key);
  let kept = draft !== null;
  let discarded = false;
  if (draft && JSON.stringify(draft.state) !== initial) {
    applyState(form, draft.state);
    say(`Your unsaved draft from ${new Date(draft.savedAt).toLocaleString()} is back.`);
    form.dataset.draftRestored = "1";
  }
  let timer = null;
  function save() {
    if (timer !== null) { clearTimeout(timer); timer = null; }
    const state = formState(form);
    if (discarded || (!kept && JSON.stringify(state) === initial)) return;
    try {
      storage.setItem(key, JSON.stringify({ savedAt: Date.now(), state }));
      kept = true;
      say("Draft kept in this browser.");
    } catch (error) {
      say("This browser cannot keep a draft (its storage is full or disabled).");
    }
  }
  const soon = () => { if (timer === null) timer = setTimeout(save, DRAFT_SAVE_DELAY_MS); };
  ["input", "change", "click", "drop", "keyup"].forEach((type) => form.addEventListener(type, soon));
  form.addEventListener("submit", save);  // the latest state, should the answer not reach the server
  window.addEventListener("pagehide", save);
  document.querySelectorAll("[data-discard-draft]").forEach((link) => link.addEventListener("click", () => {
    discarded = true;  // "Keep my answer as it is": the edits are dropped, and not written back on leaving
    forgetDraft(key);
  }));
}

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
  setUpRatingKeys(form, cards);
}

// The rating and flag keys of a ranking form: they act on one highlighted card, never while typing.
function setUpRatingKeys(form, cards) {
  let active = null;
  function highlight(card, focus) {
    if (active) active.classList.remove("active-card");
    active = card;
    card.classList.add("active-card");
    if (focus) { card.focus(); card.scrollIntoView({ block: "nearest" }); }
  }
  const pick = (input) => {
    input.checked = input.type === "radio" ? true : !input.checked;
    input.dispatchEvent(new Event("change", { bubbles: true }));  // the warning and the draft follow
  };
  cards().forEach((card) => {
    card.addEventListener("focusin", () => highlight(card, false));
    card.addEventListener("pointerdown", () => highlight(card, false));
  });
  highlight(cards()[0], false);
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.altKey || event.metaKey || typingIn(event.target)) return;
    if (event.target.closest && event.target.closest("form") && event.target.closest("form") !== form) return;
    const key = event.key.toLowerCase();
    const all = cards();
    if (key === "j" || key === "k") {
      const next = all.indexOf(active) + (key === "j" ? 1 : -1);
      if (next >= 0 && next < all.length) highlight(all[next], true);
      event.preventDefault();
      return;
    }
    const input = active.querySelector(`[data-rating-key="${CSS.escape(key)}"], [data-flag-key="${CSS.escape(key)}"]`);
    if (input) { event.preventDefault(); pick(input); }
  });
}

function setUpVerdictKeys(form) {
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.altKey || event.metaKey || typingIn(event.target)) return;
    const button = form.querySelector(`[data-key="${event.key.toLowerCase()}"]`);
    if (button) { event.preventDefault(); button.click(); }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  forgetOldDrafts();
  forgetDraft(document.body.dataset.savedDraft);
  document.querySelectorAll("form[data-draft]").forEach(setUpDraft);
  document.querySelectorAll("[data-rank-list]").forEach(setUpRanking);
  document.querySelectorAll(".ab-form").forEach(setUpVerdictKeys);
  document.querySelectorAll("[data-submit-on-ctrl-enter]").forEach((area) =>
    area.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); area.form.requestSubmit(); }
    }));
});
