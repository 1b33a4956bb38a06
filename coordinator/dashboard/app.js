// siren-edge coordinator dashboard: polls the read-only API and draws plain SVG.
// No external resources: the machines running a fleet are usually offline.
"use strict";

(function () {
  const POLL_MS = 2000;
  const SVG_NS = "http://www.w3.org/2000/svg";

  const state = {
    run: null, // /api/run
    rounds: [], // closed rounds, ascending (RoundSummary)
    clients: [], // /api/clients
    drawnRounds: -1,
    drawnBoards: "",
    timer: null,
  };

  // -- small helpers ------------------------------------------------------------------------

  function $(id) {
    return document.getElementById(id);
  }

  function svg(tag, attrs, parent) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
    if (parent) parent.appendChild(el);
    return el;
  }

  function title(el, text) {
    svg("title", {}, el).textContent = text;
  }

  function clear(el) {
    while (el.firstChild) el.removeChild(el.firstChild);
  }

  function pct(x) {
    return x === null || x === undefined ? "–" : (100 * x).toFixed(2) + "%";
  }

  function clock(t) {
    if (t === null || t === undefined) return "never";
    return new Date(t * 1000).toLocaleTimeString();
  }

  async function getJSON(url) {
    const response = await fetch(url, { cache: "no-store", headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(url + ": HTTP " + response.status);
    return response.json();
  }

  function tickStep(span, maxTicks) {
    const raw = Math.max(1, span / maxTicks);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 5, 10]) if (m * mag >= raw) return m * mag;
    return 10 * mag;
  }

  // -- polling ------------------------------------------------------------------------------

  async function poll() {
    try {
      const run = await getJSON("/api/run");
      if (state.run && state.run.run !== run.run) {
        state.rounds = [];
      }
      state.run = run;
      const last = state.rounds.length ? state.rounds[state.rounds.length - 1].round : 0;
      if (run.rounds_closed > last) {
        const fresh = await getJSON("/api/rounds?first=" + (last + 1));
        for (const r of fresh) if (r.round > last) state.rounds.push(r);
      } else if (run.rounds_closed < last) {
        state.rounds = await getJSON("/api/rounds");
      }
      state.clients = await getJSON("/api/clients");
      render();
      $("connection").className = "dot live";
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (err) {
      $("connection").className = "dot down";
      $("updated").textContent = "coordinator unreachable (" + err.message + ")";
      const chip = $("run-state");
      if (!state.run || !state.run.finished) {
        chip.textContent = "unreachable";
        chip.className = "chip down";
      }
    } finally {
      state.timer = setTimeout(poll, POLL_MS);
    }
  }

  // -- rendering ----------------------------------------------------------------------------

  function render() {
    renderHeader();
    renderCards();
    renderAccuracy();
    const boardsKey = JSON.stringify(state.run.boards);
    if (state.drawnRounds !== state.rounds.length || state.drawnBoards !== boardsKey) {
      renderHeatmap();
      state.drawnRounds = state.rounds.length;
      state.drawnBoards = boardsKey;
    }
    renderBoards();
    renderTelemetry();
    renderAdmission();
  }

  function renderHeader() {
    const run = state.run;
    $("run-id").textContent = run.run;
    $("run-aggregator").textContent = run.aggregator + (run.siren_profile ? " (" + run.siren_profile + ")" : "");
    const shown = run.finished ? run.rounds_planned : run.current_round;
    $("run-round").textContent = shown + " / " + run.rounds_planned;
    const chip = $("run-state");
    const status = run.finished ? "finished" : run.paused ? "paused" : "running";
    chip.textContent = status;
    chip.className = "chip " + status;
  }

  function renderCards() {
    const run = state.run;
    const last = state.rounds[state.rounds.length - 1];
    $("card-accuracy").textContent = last ? pct(last.test_accuracy) : "–";
    $("card-rounds").textContent = run.rounds_closed + " / " + run.rounds_planned;
    $("card-alarms").textContent = last ? last.alarms.length + " / " + last.reported.length : "–";
    const online = state.clients.filter((c) => c.status === "online").length;
    $("card-online").textContent = online + " / " + state.clients.length;
    let rejected = 0;
    for (const [reason, n] of Object.entries(run.admission)) {
      if (reason !== "accepted" && reason !== "duplicate") rejected += n;
    }
    $("card-rejected").textContent = String(rejected);
    const open = run.open_round;
    $("card-open").textContent = open
      ? "round " + open.round + ": " + open.admitted.length + " admitted, " + open.missing.length + " missing"
      : run.finished
        ? "run finished"
        : "–";
    renderBans(run);
  }

  // SIREN's bans; with the simulator's list of malicious boards, also how many of them are honest
  // boards and how many attackers are still admitted (a real coordinator cannot know either).
  function renderBans(run) {
    const card = $("card-bans");
    const banned = run.banned || [];
    let text = banned.length + " banned";
    let detail = banned.length ? "banned: " + banned.join(", ") : "no board banned";
    if (run.known_malicious !== null && run.known_malicious !== undefined) {
      const honest = run.honest_banned || [];
      const missed = run.attackers_missed || [];
      text += " · " + honest.length + " honest · " + missed.length + " of " + run.known_malicious.length + " attackers missed";
      detail += "; honest boards banned: " + (honest.join(", ") || "none") + "; attackers missed: " + (missed.join(", ") || "none");
      card.setAttribute("data-honest-banned", String(honest.length));
      card.setAttribute("data-attackers-missed", String(missed.length));
    }
    card.textContent = text;
    card.setAttribute("title", detail);
    card.setAttribute("data-banned", String(banned.length));
  }

  function renderAccuracy() {
    const chart = $("accuracy-chart");
    clear(chart);
    const width = Math.max(320, chart.clientWidth || 800);
    const height = 280;
    chart.setAttribute("viewBox", "0 0 " + width + " " + height);
    const m = { left: 48, right: 16, top: 12, bottom: 34 };
    const w = width - m.left - m.right;
    const h = height - m.top - m.bottom;
    const rounds = state.rounds;
    const maxRound = Math.max(state.run.rounds_planned, rounds.length ? rounds[rounds.length - 1].round : 1, 2);
    const x = (r) => m.left + ((r - 1) / (maxRound - 1)) * w;
    const y = (a) => m.top + (1 - a) * h;

    for (const a of [0, 0.25, 0.5, 0.75, 1]) {
      svg("line", { class: "grid", x1: m.left, x2: m.left + w, y1: y(a), y2: y(a) }, chart);
      const t = svg("text", { x: m.left - 6, y: y(a) + 4, "text-anchor": "end" }, chart);
      t.textContent = Math.round(a * 100) + "%";
    }
    svg("line", { class: "axis", x1: m.left, x2: m.left + w, y1: m.top + h, y2: m.top + h }, chart);
    svg("line", { class: "axis", x1: m.left, x2: m.left, y1: m.top, y2: m.top + h }, chart);
    const step = tickStep(maxRound - 1, 10);
    for (let r = 1; r <= maxRound; r += step) {
      const t = svg("text", { x: x(r), y: m.top + h + 16, "text-anchor": "middle" }, chart);
      t.textContent = String(r);
    }
    const label = svg("text", { x: m.left + w / 2, y: height - 2, "text-anchor": "middle" }, chart);
    label.textContent = "round";

    const points = rounds.filter((r) => r.test_accuracy !== null);
    chart.setAttribute("data-rounds", String(points.length));
    if (!points.length) {
      const t = svg("text", { class: "empty", x: m.left + w / 2, y: m.top + h / 2, "text-anchor": "middle" }, chart);
      t.textContent = rounds.length ? "no test accuracy recorded" : "waiting for the first round to close";
      return;
    }
    const path = points.map((r, i) => (i ? "L" : "M") + x(r.round).toFixed(1) + "," + y(r.test_accuracy).toFixed(1));
    svg("path", { class: "acc-line", d: path.join(" ") }, chart);
    for (const r of points) {
      const c = svg(
        "circle",
        { class: "acc-point" + (r.rollback ? " rollback" : ""), cx: x(r.round), cy: y(r.test_accuracy), r: 3.5, "data-round": r.round },
        chart,
      );
      let text = "round " + r.round + ": " + pct(r.test_accuracy);
      if (r.decision_case !== null) text += ", SIREN case " + r.decision_case + (r.rollback ? " (rollback)" : "");
      title(c, text);
    }
  }

  function caseClass(r) {
    if (r.decision_case === 1 || r.decision_case === 3 || r.decision_case === 4) return "case" + r.decision_case;
    return "case0";
  }

  function renderHeatmap() {
    const map = $("heatmap");
    clear(map);
    const boards = state.run.boards;
    const rounds = state.rounds;
    const cell = rounds.length > 120 ? 8 : rounds.length > 60 ? 11 : 16;
    const labelWidth = 8 + 7 * Math.max(5, ...boards.map((b) => b.length));
    const top = 36;
    const width = labelWidth + Math.max(rounds.length, 1) * cell + 8;
    const height = top + cell + 6 + boards.length * cell + 4;
    map.setAttribute("width", String(width));
    map.setAttribute("height", String(height));
    map.setAttribute("viewBox", "0 0 " + width + " " + height);
    map.setAttribute("data-rounds", String(rounds.length));
    map.setAttribute("data-boards", String(boards.length));
    if (!rounds.length) {
      const t = svg("text", { class: "empty", x: labelWidth, y: top + cell }, map);
      t.textContent = "waiting for the first round to close";
      return;
    }
    // Label every k-th round, k the smallest of 1, 2, 5, 10, ... leaving ~28 px per label.
    const every = tickStep(28 / cell, 1);
    rounds.forEach((r, j) => {
      const x = labelWidth + j * cell;
      if (r.round % every === 0 || (r.round === 1 && every > 2)) {
        const t = svg("text", { x: x + cell / 2, y: 12, "text-anchor": "middle" }, map);
        t.textContent = String(r.round);
      }
      const box = svg("rect", { class: "case-box " + caseClass(r), x: x, y: top - 16, width: cell, height: cell, "data-round": r.round }, map);
      title(
        box,
        "round " + r.round + ": " + (r.decision_case !== null ? "SIREN case " + r.decision_case + " (" + r.decision_branch + ")" : "rule " + (r.rule || "?")),
      );
      if (r.decision_case !== null && cell >= 11) {
        const t = svg("text", { class: "case-label", x: x + cell / 2, y: top - 16 + cell / 2 + 4, "text-anchor": "middle" }, map);
        t.textContent = String(r.decision_case);
      }
    });
    const caption = svg("text", { x: labelWidth - 6, y: top - 16 + cell / 2 + 4, "text-anchor": "end" }, map);
    caption.textContent = "case";

    const rowTop = top + 6;
    boards.forEach((b, i) => {
      const y = rowTop + i * cell;
      const t = svg("text", { class: "board-label", x: labelWidth - 6, y: y + cell / 2 + 4, "text-anchor": "end" }, map);
      t.textContent = b;
      rounds.forEach((r, j) => {
        const x = labelWidth + j * cell;
        const reported = r.reported.includes(b);
        const alarm = r.alarms.includes(b);
        const kind = !reported ? "missing" : alarm ? "alarm" : "silent";
        const rect = svg("rect", { class: "cell " + kind, x: x, y: y, width: cell, height: cell, "data-round": r.round, "data-board": b }, map);
        let text = b + ", round " + r.round + ": " + (reported ? (alarm ? "alarm" : "no alarm") : "no update");
        if (reported && r.rejected.includes(b)) {
          svg("line", { class: "dropped", x1: x + 3, y1: y + cell - 3, x2: x + cell - 3, y2: y + 3 }, map);
          text += ", left out of the aggregate";
        } else if (reported) {
          text += ", aggregated";
        }
        title(rect, text);
      });
    });
  }

  function td(row, text, cls) {
    const cell = document.createElement("td");
    if (cls) cell.className = cls;
    cell.textContent = text;
    row.appendChild(cell);
    return cell;
  }

  function renderBoards() {
    const body = $("boards").querySelector("tbody");
    clear(body);
    for (const c of state.clients) {
      const row = document.createElement("tr");
      row.setAttribute("data-board", c.client);
      if (c.banned) row.className = "banned";
      const name = td(row, c.client, "mono");
      if (c.malicious === true) {
        const badge = document.createElement("span");
        badge.className = "badge attacker";
        badge.textContent = "attacker";
        badge.title = "made malicious by the simulator";
        name.appendChild(badge);
      }
      const status = td(row, "");
      const wrap = document.createElement("span");
      wrap.className = "status";
      const dot = document.createElement("span");
      dot.className = "dot " + c.status;
      const label = document.createElement("span");
      label.textContent = c.status;
      wrap.appendChild(dot);
      wrap.appendChild(label);
      status.appendChild(wrap);
      td(row, clock(c.last_seen), "num");
      td(row, String(c.alarms), "num");
      td(row, c.rounds_kept + " / " + c.rounds_reported, "num");
      td(row, c.penalty_count === null ? "–" : c.penalty_count.toFixed(1), "num");
      const banned = td(row, c.banned ? "" : "no");
      for (const [flag, kind] of [
        [c.siren_banned, "siren"],
        [c.admin_banned, "admin"],
      ]) {
        if (!flag) continue;
        const badge = document.createElement("span");
        badge.className = "badge " + kind;
        badge.textContent = kind === "siren" ? "SIREN" : "operator";
        banned.appendChild(badge);
        banned.appendChild(document.createTextNode(" "));
      }
      td(row, String(c.rejections), "num");
      body.appendChild(row);
    }
  }

  // -- board telemetry ----------------------------------------------------------------------

  const ABSENT = "absent";

  function seconds(s) {
    if (s < 1) return (1000 * s).toFixed(s < 0.01 ? 2 : 1) + " ms";
    return s.toFixed(s < 10 ? 2 : 1) + " s";
  }

  function family(figures, prefix) {
    const out = [];
    for (const [name, value] of Object.entries(figures)) {
      if (name.startsWith(prefix)) out.push([name.slice(prefix.length), value]);
    }
    return out;
  }

  // A cell for a figure the board may not have: its text, or "absent" (never a made-up value).
  function figureCell(row, kind, text, help) {
    const cell = td(row, text === null ? ABSENT : text, text === null ? "absent" : "num");
    cell.setAttribute("data-figure", kind);
    cell.title = text === null ? help : cell.title;
    return cell;
  }

  function timePair(f, wall, cpu) {
    if (!(wall in f)) return null;
    return seconds(f[wall]) + " / " + (cpu in f ? seconds(f[cpu]) : "–");
  }

  function renderTelemetry() {
    const body = $("telemetry").querySelector("tbody");
    clear(body);
    for (const c of state.clients) {
      const row = document.createElement("tr");
      row.setAttribute("data-board", c.client);
      td(row, c.client, "mono");
      const t = c.telemetry;
      if (!t) {
        row.setAttribute("data-round", "");
        const none = td(row, "no figures reported", "absent");
        none.colSpan = 7;
        body.appendChild(row);
        continue;
      }
      row.setAttribute("data-round", String(t.round));
      const f = t.figures;
      td(row, String(t.round), "num").title = "received " + clock(t.at);

      let rss = null;
      if ("rss_peak_mib" in f) {
        rss = f.rss_peak_mib.toFixed(0) + " MiB";
        if (t.process_boards > 1) rss += ", process shared by " + t.process_boards + " boards";
      }
      figureCell(row, "rss", rss, "the board reports no memory figure");
      figureCell(row, "alarm", timePair(f, "alarm_s", "alarm_cpu_s"), "the alarm did not run");
      figureCell(row, "train", timePair(f, "train_s", "train_cpu_s"), "not reported");

      const zones = family(f, "temp_c.");
      const temp = figureCell(
        row,
        "temperature",
        "soc_temp_c" in f ? f.soc_temp_c.toFixed(1) + " °C" : null,
        zones.length ? "no SoC zone among the board's thermal zones" : "the board has no thermal zone",
      );
      if (zones.length) {
        temp.title = zones.map(([z, v]) => z + ": " + v.toFixed(1) + " °C").join("\n");
      }

      let throttled = null;
      if (t.throttled !== null) {
        throttled = t.throttled.length ? t.throttled.join(", ") : "none";
      }
      const thr = figureCell(row, "throttling", throttled, "not a Raspberry Pi (no vcgencmd)");
      if (t.throttled !== null && t.throttled.length) {
        thr.className = "warn";
        thr.title = "get_throttled = 0x" + f.throttled_flags.toString(16);
      }

      const rails = family(f, "power_mw.");
      let power = null;
      if ("power_mw" in f) power = (f.power_mw / 1000).toFixed(2) + " W";
      else if (rails.length) power = "rails only (no input rail)";
      const pw = figureCell(row, "power", power, "the board has no power monitor");
      if (rails.length) {
        pw.title = rails.map(([r, v]) => r + ": " + (v / 1000).toFixed(2) + " W").join("\n");
      }
      body.appendChild(row);
    }
  }

  function renderAdmission() {
    const body = $("admission").querySelector("tbody");
    clear(body);
    const entries = Object.entries(state.run.admission).sort((a, b) => b[1] - a[1]);
    if (!entries.length) {
      const row = document.createElement("tr");
      td(row, "no message yet");
      td(row, "");
      body.appendChild(row);
    }
    for (const [reason, n] of entries) {
      const row = document.createElement("tr");
      td(row, reason, "mono");
      td(row, String(n), "num");
      body.appendChild(row);
    }
  }

  window.addEventListener("resize", () => {
    if (state.run) renderAccuracy();
  });
  document.addEventListener("DOMContentLoaded", poll);
})();
