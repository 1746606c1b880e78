// ESIR console: live updates over Server-Sent Events, the rollout form's
// preview, the swarm chart. No dependencies.
"use strict";
(function () {
  const $ = (s, r) => (r || document).querySelector(s);
  const $$ = (s, r) => Array.from((r || document).querySelectorAll(s));
  const esc = (s) => String(s == null ? "" : s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
  function bytes(n) {
    const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return i === 0 ? n + " B" : n.toFixed(1) + " " + u[i];
  }
  const rate = (r) => (r > 0 ? bytes(Math.floor(r)) + "/s" : "—");
  const pct = (p) => (Math.round(p * 10) / 10).toFixed(1) + "%";

  function setBar(el, p) {
    const f = el.querySelector(".fill"), s = el.querySelector("span");
    if (f) f.style.width = Math.max(0, Math.min(100, p)) + "%";
    if (s) s.textContent = pct(p);
  }
  function setField(el, v, obj) {
    if (el.classList.contains("bar")) { setBar(el, +v || 0); return; }
    if (el.classList.contains("badge")) {
      el.textContent = v;
      el.className = "badge " + (el.dataset.cls || "st-") + v;
      return;
    }
    if (el.dataset.fmt === "rate") { el.textContent = rate(+v || 0); return; }
    if (el.dataset.f === "ph" && obj && obj.s === "failed" && obj.why && !el.closest("#targets")) {
      el.innerHTML = '<span class="reason">' + esc(obj.why) + "</span>"; return;
    }
    el.textContent = v == null ? "" : v;
  }
  // apply updates every element tagged data-k=key with the object's fields.
  function apply(key, obj) {
    for (const row of $$('[data-k="' + CSS.escape(key) + '"]')) {
      const fields = row.dataset.f ? [row] : [];
      for (const el of fields.concat($$("[data-f]", row))) {
        const f = el.dataset.f;
        if (f in obj) setField(el, obj[f], obj);
        else if (f === "why" || f === "ph" || f === "r" || f === "pe") setField(el, f === "r" ? 0 : "", obj);
      }
    }
  }

  function banner(text) {
    const b = $("#banner"); b.textContent = text; b.hidden = false;
  }
  function gone(topic) {
    const what = topic.startsWith("node/") ? "This node" : topic.startsWith("rollout/") ? "This rollout" : "This item";
    banner(what + " no longer exists: it was removed while you were looking at it. The page shows its last known state.");
    for (const b of $$("main form button")) b.disabled = true;
  }

  const handlers = {
    counts(v) { for (const k in v) { const el = $('[data-count="' + k + '"]'); if (el) el.textContent = v[k]; } },
    total(v) { const el = $('[data-count="total"]'); if (el) el.textContent = v; },
    rate(v) { const el = $("#dash-rate"); if (el) el.textContent = v; },
    chart(v) { drawChart(v); },
    rollouts(list) {
      const tb = $("#dash-rollouts tbody"); if (!tb) return;
      tb.innerHTML = list.length ? list.map((r) =>
        '<tr><td><a href="/ui/rollouts/' + r.id + '">#' + r.id + "</a></td><td>" + esc(r.img) + '</td><td><span class="badge st-' + esc(r.s) + '">' + esc(r.s) +
        '</span></td><td><div class="bar"><div class="fill" style="width:' + r.p + '%"></div><span>' + pct(r.p) + '</span></div><div class="small muted">' +
        r.ok + "/" + r.t + " done" + (r.fail ? ", " + r.fail + " failed" : "") + "</div></td><td>" + esc(r.eta) + "</td></tr>").join("")
        : '<tr class="empty"><td colspan="5">No rollout is running. <a href="/ui/rollouts/new">Start one</a>.</td></tr>';
    },
    failures(list) {
      const tb = $("#dash-failures tbody"); if (!tb) return;
      tb.innerHTML = list.length ? list.map((f) => '<tr><td><a href="/ui/nodes/' + esc(f.mac) + '">' + esc(f.h) + '</a></td><td class="mono">' + esc(f.mac) +
        '</td><td class="reason">' + esc(f.why) + "</td><td>" + esc(f.when) + "</td></tr>").join("")
        : '<tr class="empty"><td colspan="4">No failed node.</td></tr>';
    },
    events(list) {
      const tb = $("#events tbody"); if (!tb) return;
      tb.innerHTML = list.map((e) => '<tr><td class="mono small">' + esc(e.t) + "</td><td>" + (e.f ? esc(e.f) + " → " : "") + esc(e.to) +
        '</td><td class="small">' + esc(e.why) + "</td></tr>").join("");
    },
    log(lines) {
      const pre = $("#log"); if (!pre) return;
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.textContent = lines.length ? lines.join("\n") + "\n" : "(no log lines yet)";
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    },
    summary(s) {
      const set = (id, t) => { const el = $(id); if (el) el.textContent = t; };
      const st = $("#r-state"); if (st) setField(st, s.s);
      const bar = $("#r-bar"); if (bar) setBar(bar, s.p);
      set("#r-batch", s.b + " / " + s.bs); set("#r-done", s.ok + " / " + s.t); set("#r-active", s.act);
      set("#r-failed", s.fail); const f = $("#r-failed"); if (f) f.className = s.fail ? "bad" : "";
      set("#r-rate", rate(s.r)); set("#r-peers", s.pe); set("#r-eta", s.eta);
      const acts = $("#r-actions"); if (acts) acts.dataset.state = s.s;
      const why = $("#r-reason"); if (why) { why.textContent = s.why || ""; why.hidden = !s.why; }
    },
  };

  // The cluster page: a member that joined while the page was open.
  function memberRow(k, m) {
    const tb = $("#members tbody"); if (!tb) return;
    const empty = $("tr.empty", tb); if (empty) empty.remove();
    const tr = document.createElement("tr"); tr.dataset.k = k;
    tr.innerHTML = '<td class="num">' + m.id + "</td><td>" + esc(m.n) + '</td><td class="mono">' + esc(m.addr) + "</td><td>" + esc(m.role) +
      '</td><td><span class="badge st-' + esc(m.s) + '" data-f="s">' + esc(m.s) + '</span></td><td data-f="ver">' + esc(m.ver) +
      '</td><td class="small" data-f="time">' + esc(m.time) + '</td><td class="mono" data-f="vip">' + esc(m.vip) + '</td><td class="num" data-f="onl">' +
      esc(m.onl) + '</td><td data-f="home">' + esc(m.home) + '</td><td class="small" data-f="rep">' + esc(m.rep) + '</td><td class="reason" data-f="chk">' + esc(m.chk) + "</td>";
    tb.appendChild(tr);
  }
  handlers.csum = (s) => {
    const set = (id, t, bad) => { const el = $(id); if (!el) return; el.textContent = t; if (bad !== undefined) el.className = bad ? "bad" : ""; };
    set("#c-q", s.q, !s.qok); set("#c-m", s.m); set("#c-c", s.c); set("#c-v", s.v); set("#c-h", s.h, s.split);
    const w = $("#c-w"); if (w) w.innerHTML = (s.w || []).map((x) => '<p class="reason">warning: ' + esc(x) + "</p>").join("");
    const tb = $("#ipvs tbody"); if (!tb) return;
    const rows = s.ipvs || [];
    tb.innerHTML = rows.length ? rows.map((r) => '<tr><td class="mono">' + esc(r.service) + '</td><td class="mono">' + esc(r.real) + '</td><td class="num">' +
      r.weight + '</td><td class="num">' + r.active + '</td><td class="num">' + r.inactive + "</td></tr>").join("")
      : '<tr class="empty"><td colspan="5">No director reports an IPVS table.</td></tr>';
  };

  // The rate chart, drawn the same way as the server's first rendering.
  function drawChart(c) {
    const svg = $("#rate-chart"); if (!svg) return;
    const w = 600, h = 160, top = c.max > 0 ? c.max : 1, n = c.rate.length;
    const pts = c.rate.map((v, i) => (w * i / Math.max(n - 1, 1)).toFixed(1) + "," + (h - h * v / top * 0.9).toFixed(1)).join(" ");
    svg.querySelector(".line").setAttribute("points", pts);
    svg.querySelector(".area").setAttribute("points", "0," + h + " " + pts + " " + w + "," + h);
    const m = $("#chart-max"); if (m) m.textContent = "peak " + rate(c.max);
  }

  // The swarm page's HAVE chart: one group of bars per image.
  const swarmState = {};
  function drawHave() {
    const box = $("#have-chart"); if (!box) return;
    const keys = Object.keys(swarmState).sort((a, b) => (a === "seeder") - (b === "seeder") || a.localeCompare(b));
    if (!keys.length) { box.innerHTML = '<p class="muted">No HAVE counters reported yet.</p>'; return; }
    let top = 1;
    for (const k of keys) { const s = swarmState[k]; top = Math.max(top, s.em || 0, s.se || 0, s.su || 0, s.co || 0); }
    box.innerHTML = keys.map((k) => {
      const s = swarmState[k];
      const bars = [["em", s.em], ["se", s.se], ["su", s.su], ["co", s.co]].map(([c, v], i) => {
        const wd = Math.max(0.5, 80 * (v || 0) / top);
        return '<rect class="b-' + c + '" x="0" y="' + (i * 20 + 2) + '" width="' + wd + '%" height="16" rx="3"></rect>' +
          '<text x="' + (wd + 1) + '%" y="' + (i * 20 + 14) + '">' + (v || 0).toLocaleString() + "</text>";
      }).join("");
      return '<div class="hrow"><div class="name">' + esc(s.ref || k) + '</div><svg role="presentation">' + bars + "</svg></div>";
    }).join("");
  }

  function onMessage(topic, msg) {
    const set = msg.set || {};
    for (const k in set) {
      const v = set[k];
      if (k === "gone") { if (v) gone(topic); continue; }
      if (topic === "swarm") { swarmState[k] = v; apply(k, v); continue; }
      if (topic === "dash" && handlers[k]) { handlers[k](v); continue; }
      if (topic.startsWith("node/") && (k === "events" || k === "log")) { handlers[k](v); continue; }
      if (topic.startsWith("rollout/") && k === "summary") { handlers.summary(v); continue; }
      if (topic === "cluster" && k === "csum") { handlers.csum(v); continue; }
      if (topic === "cluster" && !$('[data-k="' + CSS.escape(k) + '"]')) { memberRow(k, v); continue; }
      apply(k, v);
    }
    for (const k of msg.del || []) {
      if (topic === "swarm") delete swarmState[k];
      for (const row of $$('tr[data-k="' + CSS.escape(k) + '"]')) row.classList.add("removed");
    }
    if (topic === "swarm") drawHave();
  }

  function connect(topic) {
    const live = $("#live");
    const es = new EventSource("/ui/events?topic=" + encodeURIComponent(topic));
    es.onopen = () => { if (live) { live.textContent = "live"; live.className = "live on"; } };
    es.onmessage = (e) => { try { onMessage(topic, JSON.parse(e.data)); } catch (err) { console.error(err); } };
    es.onerror = () => {
      if (live) { live.textContent = "reconnecting…"; live.className = "live"; }
      if (es.readyState === EventSource.CLOSED) {
        // Closed for good: the session may have ended.
        fetch("/ui/events?topic=" + encodeURIComponent(topic), {headers: {Accept: "application/json"}, method: "HEAD"}).then((r) => {
          if (r.status === 401) location.href = "/ui/login?expired=1&next=" + encodeURIComponent(location.pathname + location.search);
          else setTimeout(() => connect(topic), 2000);
        }, () => setTimeout(() => connect(topic), 2000));
      }
    };
  }

  // Rollout form: show which nodes the selection takes, as it is typed.
  function preview() {
    const names = $("#names"), labels = $("#labels"); if (!names || !labels) return;
    let timer = 0, seq = 0;
    const run = () => {
      const my = ++seq;
      const q = new URLSearchParams({names: names.value, labels: labels.value});
      fetch("/ui/preview?" + q, {headers: {Accept: "application/json"}}).then((r) => {
        if (r.status === 401) { location.href = "/ui/login?expired=1&next=" + encodeURIComponent(location.pathname); return null; }
        return r.json();
      }).then((d) => {
        if (!d || my !== seq) return;
        $("#preview-count").textContent = d.count;
        const notes = [];
        if (d.unknown.length) notes.push("Unknown: " + d.unknown.join(", "));
        if (d.errors && d.errors.labels) notes.push(d.errors.labels);
        const busy = d.nodes.filter((n) => n.busy).length;
        if (busy) notes.push(busy + " selected node(s) are busy installing: the rollout will be refused.");
        if (!notes.length) notes.push(d.count ? (d.count > d.nodes.length ? "First " + d.nodes.length + " of " + d.count + " nodes:" : d.count + " node(s) will be installed:")
          : names.value.trim() || labels.value.trim() ? "The selection matches no node." : "Name nodes or labels to see which nodes the rollout will take.");
        $("#preview-note").textContent = notes.join(" ");
        $("#preview").innerHTML = d.nodes.map((n) => '<li class="' + (n.busy ? "busy" : "") + '">' + esc(n.hostname) + ' <span class="mono">' + esc(n.mac) +
          '</span> <span class="badge st-' + esc(n.state) + '">' + esc(n.state) + "</span></li>").join("");
      }).catch(() => {});
    };
    const later = () => { clearTimeout(timer); timer = setTimeout(run, 200); };
    names.addEventListener("input", later); labels.addEventListener("input", later);
    run();
  }

  document.addEventListener("DOMContentLoaded", () => {
    for (const f of $$("form[data-confirm]")) {
      f.addEventListener("submit", (e) => { if (!confirm(f.dataset.confirm)) e.preventDefault(); });
    }
    const topic = document.body.dataset.topic;
    if (topic) connect(topic);
    preview();
    if ($("#have-chart")) {
      for (const row of $$("#swarm-table tr[data-k]")) {
        const s = {ref: row.cells[0].textContent.trim()};
        for (const el of $$("[data-f]", row)) s[el.dataset.f] = +el.textContent.replace(/[^0-9.]/g, "") || 0;
        swarmState[row.dataset.k] = s;
      }
      drawHave();
    }
  });
})();
