// chatloop label: keyboard shortcuts and drag-and-drop ranking. No framework, no build step.
// Without JavaScript every form still works (rank numbers are typed into inputs instead).
"use strict";

document.documentElement.classList.add("js");

function typing(target) {
  return target.closest("input[type=text], input[type=password], input[type=number], textarea, select") !== null;
}

function setupRanking(list) {
  const form = list.closest("form");
  const tied = new Map(); // card -> tied with the card above it
  const cards = () => Array.from(list.querySelectorAll(".card"));

  function update() {
    let rank = 0;
    cards().forEach((card, i) => {
      if (i === 0) tied.set(card, false);
      rank = i > 0 && tied.get(card) ? rank : rank + 1;
      card.querySelector(".badge").textContent = String(rank);
      card.querySelector("input[type=number]").value = String(rank);
      card.querySelector(".tie-mark").hidden = !tied.get(card);
      card.classList.toggle("tied", !!tied.get(card));
    });
  }

  function move(card, to) {
    const all = cards();
    to = Math.max(0, Math.min(all.length - 1, to));
    const rest = all.filter((c) => c !== card);
    rest.splice(to, 0, card);
    rest.forEach((c) => list.appendChild(c));
    card.focus();
    update();
  }

  list.addEventListener("keydown", (event) => {
    const card = event.target.closest(".card");
    if (!card || event.ctrlKey || event.metaKey || event.altKey) return;
    const all = cards();
    const i = all.indexOf(card);
    const key = event.key;
    let handled = true;
    if ((key === "ArrowUp" && event.shiftKey) || key === "K") move(card, i - 1);
    else if ((key === "ArrowDown" && event.shiftKey) || key === "J") move(card, i + 1);
    else if (key === "ArrowUp" || key === "k") all[Math.max(0, i - 1)].focus();
    else if (key === "ArrowDown" || key === "j") all[Math.min(all.length - 1, i + 1)].focus();
    else if (/^[1-9]$/.test(key) && Number(key) <= all.length) move(card, Number(key) - 1);
    else if (key === "t" && i > 0) { tied.set(card, !tied.get(card)); update(); }
    else handled = false;
    if (handled) event.preventDefault();
  });

  let dragged = null;
  list.addEventListener("dragstart", (event) => {
    dragged = event.target.closest(".card");
    event.dataTransfer.effectAllowed = "move";
  });
  list.addEventListener("dragover", (event) => { if (dragged) event.preventDefault(); });
  list.addEventListener("drop", (event) => {
    event.preventDefault();
    const over = event.target.closest(".card");
    if (dragged && over && over !== dragged) move(dragged, cards().indexOf(over));
    dragged = null;
  });

  // Start from the ranks in the inputs (a re-shown page keeps its answer): sort the cards by them.
  const start = cards().map((c) => [Number(c.querySelector("input[type=number]").value), c]);
  start.sort((a, b) => a[0] - b[0]);
  start.forEach(([r, c], i) => { list.appendChild(c); tied.set(c, i > 0 && r === start[i - 1][0]); });
  update();
  form.addEventListener("submit", update);
  const first = cards()[0];
  if (first) first.focus();
}

document.addEventListener("DOMContentLoaded", () => {
  const list = document.getElementById("ranking");
  if (list) setupRanking(list);
  const form = document.getElementById("task-form");
  if (!form) return;
  const kind = form.dataset.kind;

  form.addEventListener("submit", () => {
    // A double click sends once (the server would return the first label anyway).
    const button = form.querySelector("button[type=submit]");
    setTimeout(() => { button.disabled = true; }, 0);
  });

  const addTurn = document.getElementById("add-turn");
  if (addTurn) {
    addTurn.addEventListener("click", () => {
      const turns = document.getElementById("turns");
      turns.appendChild(document.getElementById("turn-template").content.cloneNode(true));
      const areas = turns.querySelectorAll("textarea");
      areas[areas.length - 2].focus();
    });
  }

  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit();
      return;
    }
    if (typing(event.target) || event.ctrlKey || event.metaKey || event.altKey) return;
    const pick = (id) => { const el = document.getElementById(id); if (el) { el.checked = true; el.focus(); return true; } return false; };
    let handled = false;
    if (event.key === "s") {
      const reason = document.getElementById("skip-reason");
      if (reason) { reason.focus(); handled = true; }
    } else if (kind === "ranking" && event.key === "n") {
      const box = document.getElementById("none-acceptable");
      box.checked = !box.checked;
      handled = true;
    } else if (kind === "rating" && /^[1-7]$/.test(event.key)) {
      handled = pick("likert-" + event.key);
    } else if (kind === "comparison" && ["a", "b", "t"].includes(event.key)) {
      handled = pick("winner-" + (event.key === "t" ? "tie" : event.key));
    }
    if (handled) event.preventDefault();
  });
});
