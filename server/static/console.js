// kubetune console: live updates without reloading. The server renders (and escapes) every
// fragment; this script only fetches them from the same origin and swaps them in.
"use strict";

const POLL_MS = 2000;

function follow(holder) {
  const url = holder.dataset.poll;
  let timer = null;
  async function refresh() {
    try {
      const answer = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (answer.redirected && new URL(answer.url).pathname === "/ui/login") {
        window.location.assign(answer.url); // the session ended: sign in again
        return;
      }
      if (answer.ok) {
        holder.innerHTML = await answer.text();
        holder.dataset.updated = String(Date.now());
      }
    } catch (_) {
      // offline for a moment: try again on the next tick
    }
    const live = holder.querySelector("[data-final]");
    if (live && live.dataset.final === "true") {
      return; // the job has ended: nothing more will change
    }
    timer = window.setTimeout(refresh, POLL_MS);
  }
  const initial = holder.querySelector("[data-final]");
  if (!initial || initial.dataset.final !== "true") {
    timer = window.setTimeout(refresh, POLL_MS);
  }
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && timer === null) {
      refresh();
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-poll]").forEach(follow);
  const problems = document.getElementById("problems");
  if (problems) {
    problems.focus(); // a refused form: say why first, to screen readers and keyboards too
  }
});
