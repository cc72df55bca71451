// netstack up dashboard: live figures over Server-Sent Events (api/events), polling
// api/snapshot when the stream is refused. Relative URLs only: the page is mounted under
// /_dashboard/ behind the balancer. No inline scripts or styles (the page's CSP).
"use strict";

(function () {
  const COLORS = ["#2dd4bf", "#a78bfa", "#f472b6", "#fbbf24", "#60a5fa", "#fb923c", "#4ade80", "#e879f9"];
  const MAX_POINTS = 600;
  const $ = (id) => document.getElementById(id);

  let history = [];          // [{t, rps: {name: v}, p99: {name: v}, lb_rps}]
  let latest = null;         // the last snapshot
  let interval = 1;
  let source = null;         // the EventSource
  let pollTimer = null;
  let retryStreamTimer = null;
  const cards = new Map();   // component name -> {root, refs}
  const pending = new Set(); // names with a kill/restore request in flight
  const charts = {rps: null, p99: null, key: ""};

  // ------------------------------------------------------------------ formatting

  function fmtRate(v) {
    if (v === null || v === undefined) return "—";
    if (v === 0) return "0";
    if (v < 10) return v.toFixed(1);
    return Math.round(v).toLocaleString("en-US");
  }
  function fmtMs(v) {
    if (v === null || v === undefined) return "—";
    if (v < 1) return v.toFixed(2) + " ms";
    if (v < 10) return v.toFixed(1) + " ms";
    return Math.round(v).toLocaleString("en-US") + " ms";
  }
  function fmtInt(v) {
    if (v === null || v === undefined) return "—";
    return Math.round(v).toLocaleString("en-US");
  }
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }
  function setFig(node, text) {
    setText(node, text);
    node.classList.toggle("nodata", text === "—" || text === "no data");
  }
  function colorOf(name) {
    const names = webNames();
    const i = names.indexOf(name);
    return COLORS[(i < 0 ? 0 : i) % COLORS.length];
  }
  function webNames() {
    return latest ? latest.components.filter((c) => c.kind === "web").map((c) => c.name) : [];
  }

  const STATE_PILL = {running: "pill-ok", starting: "pill-wait", restarting: "pill-warn", stopped: "pill-bad", failed: "pill-bad"};
  const LB_PILL = {up: "pill-ok", down: "pill-bad", ejected: "pill-bad", probing: "pill-warn", slow_start: "pill-warn"};

  function pill(node, text, cls) {
    setText(node, text);
    node.classList.add("pill");
    for (const c of [...node.classList]) if (c.startsWith("pill-") && c !== cls) node.classList.remove(c);
    node.classList.add(cls);
  }

  function toast(message, kind) {
    const t = el("div", "toast" + (kind === "info" ? " info" : ""), message);
    $("toasts").appendChild(t);
    setTimeout(() => t.remove(), kind === "info" ? 3000 : 7000);
  }

  // ------------------------------------------------------------------ web server cards

  function figure(parent, label, cls) {
    const f = el("div", "fig " + cls);
    f.appendChild(el("div", "fig-label", label));
    const v = el("div", "fig-value nodata", "—");
    f.appendChild(v);
    parent.appendChild(f);
    return v;
  }

  function webCard(c) {
    let card = cards.get(c.name);
    if (card) return card;
    const root = el("div", "card server");
    root.dataset.name = c.name;
    const head = el("div", "server-head");
    const swatch = el("span", "swatch");
    head.appendChild(swatch);
    const names = el("div");
    names.appendChild(el("div", "server-name", c.name));
    const addr = el("div", "server-addr", c.address);
    names.appendChild(addr);
    head.appendChild(names);
    const pills = el("div", "pills");
    const state = el("span", "pill pill-wait state", c.state);
    const lb = el("span", "pill pill-off lb-state", "lb: ?");
    lb.title = "the balancer's health view of this backend";
    pills.appendChild(lb);
    pills.appendChild(state);
    head.appendChild(pills);
    root.appendChild(head);
    const figs = el("div", "figures");
    const refs = {
      swatch, addr, state, lb,
      rps: figure(figs, "req/s", "fig-rps"),
      p50: figure(figs, "p50", "fig-p50"),
      p99: figure(figs, "p99", "fig-p99"),
      conns: figure(figs, "open conns", "fig-conns"),
    };
    root.appendChild(figs);
    const foot = el("div", "server-foot");
    refs.note = el("div", "note");
    foot.appendChild(refs.note);
    refs.button = el("button", "kill", "Kill");
    refs.button.type = "button";
    refs.button.addEventListener("click", () => control(c.name, refs.button.dataset.action));
    foot.appendChild(refs.button);
    root.appendChild(foot);
    $("web").appendChild(root);
    card = {root, refs};
    cards.set(c.name, card);
    return card;
  }

  function renderWeb(c) {
    const {root, refs} = webCard(c);
    refs.swatch.style.background = colorOf(c.name);
    setText(refs.addr, c.address + (c.pid ? "  ·  pid " + c.pid : "") + (c.restarts ? "  ·  " + c.restarts + " restarts" : ""));
    pill(refs.state, c.state, STATE_PILL[c.state] || "pill-off");
    if (c.lb) {
      const view = c.lb.admin && c.lb.admin !== "enabled" ? c.lb.admin : c.lb.state;
      pill(refs.lb, "lb: " + view, LB_PILL[view] || "pill-warn");
      refs.lb.title = `balancer: ${c.lb.state} (${c.lb.admin}), ${c.lb.active} active, ${c.lb.total} total, ${c.lb.failures} failures, ${c.lb.ejections} ejections`;
    } else {
      pill(refs.lb, "lb: ?", "pill-off");
      refs.lb.title = c.lb_error || "";
    }
    const nodata = !c.data;
    setFig(refs.rps, nodata ? "no data" : fmtRate(c.rps));
    setFig(refs.p50, nodata ? "—" : fmtMs(c.p50_ms));
    setFig(refs.p99, nodata ? "—" : fmtMs(c.p99_ms));
    setFig(refs.conns, nodata ? "—" : fmtInt(c.open_connections));
    const down = c.state === "stopped" || c.state === "failed";
    root.classList.toggle("down", down || nodata);
    if (c.error) {
      setText(refs.note, c.error === "stopped" ? "stopped from the dashboard" : "no data: " + c.error);
      refs.note.className = "note err";
    } else {
      const total = c.requests_total === null ? "" : fmtInt(c.requests_total) + " requests";
      const extra = c.in_flight ? " · " + fmtInt(c.in_flight) + " in flight" : "";
      setText(refs.note, total + extra);
      refs.note.className = "note";
    }
    const action = down ? "restore" : "kill";
    refs.button.dataset.action = action;
    setText(refs.button, action === "kill" ? "Kill" : "Restore");
    refs.button.className = action;
    refs.button.hidden = !c.controllable;
    refs.button.disabled = pending.has(c.name);
  }

  async function control(name, action) {
    pending.add(name);
    if (latest) render(latest);
    try {
      const resp = await fetch(`api/components/${encodeURIComponent(name)}/${action}`, {
        method: "POST",
        headers: {"X-Netstack-Dashboard": "1"},
      });
      let doc = {};
      try { doc = await resp.json(); } catch (e) { doc = {}; }
      if (!resp.ok) {
        toast(`${action} ${name}: ${doc.error || resp.status + " " + resp.statusText}`);
      } else {
        toast(`${action === "kill" ? "Killed" : "Restoring"} ${name}`, "info");
      }
    } catch (e) {
      toast(`${action} ${name}: ${e}`);
    } finally {
      pending.delete(name);
      if (latest) render(latest);
    }
  }

  // ------------------------------------------------------------------ balancer + services

  function kv(parent, label, value, cls) {
    const f = el("div", "fig " + (cls || ""));
    f.appendChild(el("div", "fig-label", label));
    const v = el("div", "fig-value", value);
    if (value === "—" || value === "no data") v.classList.add("nodata");
    f.appendChild(v);
    parent.appendChild(f);
  }

  function head(card, c, sub) {
    const h = el("div", "server-head");
    const names = el("div");
    names.appendChild(el("div", "server-name", c.name));
    names.appendChild(el("div", "server-addr", sub));
    h.appendChild(names);
    const pills = el("div", "pills");
    const p = el("span", "pill " + (STATE_PILL[c.state] || "pill-off"), c.state);
    pills.appendChild(p);
    h.appendChild(pills);
    card.appendChild(h);
  }

  function renderBalancer(rows) {
    const box = $("balancer");
    box.replaceChildren();
    if (!rows.length) { box.appendChild(el("div", "card muted", "no balancer")); return; }
    for (const c of rows) {
      const card = el("div", "card server balancer");
      card.dataset.name = c.name;
      head(card, c, c.address);
      const figs = el("div", "figures");
      const nd = !c.data;
      kv(figs, "req/s", nd ? "no data" : fmtRate(c.rps), "fig-rps");
      kv(figs, "active conns", nd ? "—" : fmtInt(c.active_connections));
      kv(figs, "retries/s", nd ? "—" : fmtRate(c.retries_rps));
      kv(figs, "backend failures", nd ? "—" : fmtInt(c.backend_failures_total));
      card.appendChild(figs);
      const classes = el("div", "classes");
      for (const k of ["2xx", "3xx", "4xx", "5xx"]) {
        const chip = el("div", "cls cls-" + k, k);
        const rate = c.responses ? c.responses[k] : undefined;
        chip.appendChild(el("b", "", nd ? "—" : fmtRate(rate === undefined ? 0 : rate) + "/s"));
        classes.appendChild(chip);
      }
      card.appendChild(classes);
      if (c.error) card.appendChild(el("div", "note err", "no data: " + c.error));
      const web = latest.components.filter((w) => w.kind === "web");
      if (web.length) {
        const table = el("table", "backends");
        const hr = el("tr");
        for (const h of ["backend", "address", "health", "admin", "active", "sent", "failures"]) hr.appendChild(el("th", "", h));
        table.appendChild(hr);
        for (const w of web) {
          const tr = el("tr");
          const b = w.lb || {};
          for (const v of [w.name, w.address, b.state || "?", b.admin || "?", fmtInt(b.active), fmtInt(b.total), fmtInt(b.failures)]) {
            tr.appendChild(el("td", "", String(v)));
          }
          table.appendChild(tr);
        }
        card.appendChild(table);
      }
      box.appendChild(card);
    }
  }

  function renderServices(rows) {
    const box = $("services");
    box.replaceChildren();
    if (!rows.length) { box.appendChild(el("div", "card muted", "no gRPC or chat service")); return; }
    for (const c of rows) {
      const card = el("div", "card server " + c.kind);
      card.dataset.name = c.name;
      head(card, c, (c.kind === "rpc" ? "gRPC · " : "chat · ") + c.address);
      const figs = el("div", "figures");
      const nd = !c.data;
      if (c.kind === "rpc") {
        kv(figs, "calls/s", nd ? "no data" : fmtRate(c.calls_rps), "fig-calls");
        kv(figs, "errors/s", nd ? "—" : fmtRate(c.errors_rps), "fig-errors");
        kv(figs, "client errors/s", nd ? "—" : fmtRate(c.client_errors_rps), "fig-client-errors");
        kv(figs, "p50", nd ? "—" : fmtMs(c.p50_ms));
        kv(figs, "p99", nd ? "—" : fmtMs(c.p99_ms));
      } else {
        kv(figs, "users online", nd ? "no data" : fmtInt(c.users_online), "fig-users");
        const conns = c.connections || {};
        kv(figs, "websocket", nd ? "—" : fmtInt(conns.websocket ?? conns.ws ?? 0));
        kv(figs, "tcp", nd ? "—" : fmtInt(conns.tcp ?? 0));
        kv(figs, "messages/s", nd ? "—" : fmtRate(c.messages_rps));
      }
      card.appendChild(figs);
      if (c.error) card.appendChild(el("div", "note err", "no data: " + c.error));
      if (c.controllable && (c.state === "stopped" || c.state === "failed")) {
        const b = el("button", "restore", "Restore");
        b.type = "button";
        b.disabled = pending.has(c.name);
        b.addEventListener("click", () => control(c.name, "restore"));
        card.appendChild(b);
      }
      box.appendChild(card);
    }
  }

  // ------------------------------------------------------------------ tiles

  function renderTiles(s) {
    const rows = s.components;
    const lb = rows.find((c) => c.kind === "balancer");
    const web = rows.filter((c) => c.kind === "web");
    const rpc = rows.filter((c) => c.kind === "rpc");
    const chat = rows.filter((c) => c.kind === "chat");
    const t = s.totals || {};
    setFig($("t-lb-rps"), lb ? (lb.data ? fmtRate(lb.rps) : "no data") : fmtRate(t.web_rps));
    setText($("t-lb-total"), lb && lb.requests_total !== null && lb.requests_total !== undefined ? fmtInt(lb.requests_total) + " requests in total" : "");
    setText($("t-web-up"), web.length ? `${t.web_up} / ${t.web_total}` : "—");
    setText($("t-web-rps"), t.web_rps === null || t.web_rps === undefined ? "" : fmtRate(t.web_rps) + " req/s at the web tier");
    const p99s = web.map((c) => c.p99_ms).filter((v) => v !== null && v !== undefined);
    const p50s = web.map((c) => c.p50_ms).filter((v) => v !== null && v !== undefined);
    setFig($("t-p99"), p99s.length ? fmtMs(Math.max(...p99s)) : "—");
    setText($("t-p50"), p50s.length ? "p50 " + fmtMs(Math.max(...p50s)) : "");
    const r5 = lb && lb.data && lb.responses ? (lb.responses["5xx"] || 0) : null;
    setFig($("t-5xx"), lb ? (lb.data ? fmtRate(r5) : "no data") : "—");
    setText($("t-retries"), lb && lb.data && lb.retries_total !== null ? fmtInt(lb.retries_total) + " retries in total" : "");
    const rpcData = rpc.filter((c) => c.data);
    setFig($("t-rpc"), rpc.length ? (rpcData.length ? fmtRate(t.rpc_calls_rps) : "no data") : "—");
    const rp99 = rpcData.map((c) => c.p99_ms).filter((v) => v !== null);
    setText($("t-rpc-p99"), rp99.length ? "p99 " + fmtMs(Math.max(...rp99)) : "");
    const chatData = chat.filter((c) => c.data);
    setFig($("t-chat"), chat.length ? (chatData.length ? fmtInt(t.chat_users_online) : "no data") : "—");
    const m = chatData.map((c) => c.messages_rps).filter((v) => v !== null);
    setText($("t-chat-msgs"), m.length ? fmtRate(m.reduce((a, b) => a + b, 0)) + " messages/s" : "");
  }

  // ------------------------------------------------------------------ charts

  function axis() {
    return {stroke: "#8d9ab8", grid: {stroke: "rgba(36,48,77,.8)", width: 1}, ticks: {stroke: "rgba(36,48,77,.8)"}};
  }

  function makeChart(target, names, extra, valueFmt) {
    const series = [{}];
    for (const n of names) {
      series.push({label: n, stroke: colorOf(n), width: 2, fill: colorOf(n) + "18", spanGaps: false, value: (u, v) => valueFmt(v)});
    }
    for (const e of extra) series.push(e);
    const node = $(target);
    node.replaceChildren();
    const width = Math.max(300, node.clientWidth || 600);
    return new uPlot({
      width, height: 240, series,
      scales: {x: {time: true}, y: {range: (u, min, max) => [0, Math.max(1, max * 1.15)]}},
      axes: [
        Object.assign(axis(), {space: 70, incrs: [1, 2, 5, 10, 15, 30, 60, 120, 300, 600],
          values: (u, splits) => splits.map((t) => new Date(t * 1000).toLocaleTimeString([], {hour12: false}))}),
        Object.assign(axis(), {size: 56}),
      ],
      legend: {live: true},
      cursor: {drag: {x: false, y: false}},
    }, [[]], node);
  }

  function renderCharts() {
    const names = webNames();
    const key = names.join("\u0000");
    if (charts.key !== key || !charts.rps) {
      if (charts.rps) { charts.rps.destroy(); charts.p99.destroy(); }
      const lbSeries = {label: "balancer", stroke: "#e6ebf5", width: 1.5, dash: [6, 4], value: (u, v) => fmtRate(v)};
      charts.rps = makeChart("chart-rps", names, [lbSeries], fmtRate);
      charts.p99 = makeChart("chart-p99", names, [], fmtMs);
      charts.key = key;
    }
    const pts = history.slice(-MAX_POINTS);
    const t = pts.map((p) => p.t);
    const rps = [t], p99 = [t];
    for (const n of names) {
      rps.push(pts.map((p) => (p.rps && n in p.rps ? p.rps[n] : null)));
      p99.push(pts.map((p) => (p.p99 && n in p.p99 ? p.p99[n] : null)));
    }
    rps.push(pts.map((p) => (p.lb_rps === undefined ? null : p.lb_rps)));
    charts.rps.setData(rps);
    charts.p99.setData(p99);
    if (pts.length > 1) {
      const span = Math.round((pts[pts.length - 1].t - pts[0].t) / 60);
      for (const s of document.querySelectorAll(".span-label")) setText(s, span < 1 ? "minute" : span + " min");
    }
  }

  window.addEventListener("resize", () => {
    for (const [id, chart] of [["chart-rps", charts.rps], ["chart-p99", charts.p99]]) {
      if (chart) chart.setSize({width: Math.max(300, $(id).clientWidth), height: 240});
    }
  });

  // ------------------------------------------------------------------ data flow

  function render(s) {
    const rows = s.components;
    const web = rows.filter((c) => c.kind === "web");
    for (const c of web) renderWeb(c);
    for (const [name, card] of cards) {
      if (!web.some((c) => c.name === name)) { card.root.remove(); cards.delete(name); }
    }
    if (!web.length && !$("web").children.length) $("web").appendChild(el("div", "card muted empty", "no web servers yet"));
    if (web.length) for (const e of $("web").querySelectorAll(".empty")) e.remove();
    renderBalancer(rows.filter((c) => c.kind === "balancer"));
    renderServices(rows.filter((c) => c.kind === "rpc" || c.kind === "chat"));
    renderTiles(s);
    renderCharts();
    const when = new Date(s.time * 1000);
    setText($("updated"), s.seq ? "updated " + when.toLocaleTimeString() : "waiting for data…");
  }

  function receive(s) {
    interval = s.interval || interval;
    if (s.history) {
      history = s.history;
    } else if (s.point && (!history.length || history[history.length - 1].t !== s.point.t)) {
      history.push(s.point);
      if (history.length > MAX_POINTS) history.splice(0, history.length - MAX_POINTS);
    }
    latest = s;
    render(s);
  }

  function setConn(text, cls) { pill($("conn"), text, cls); }

  function startStream() {
    clearTimeout(retryStreamTimer);
    if (!window.EventSource) { startPolling(); return; }
    source = new EventSource("api/events");
    source.onopen = () => { stopPolling(); setConn("live", "pill-ok"); };
    source.onmessage = (ev) => {
      try { receive(JSON.parse(ev.data)); } catch (e) { console.error(e); }
    };
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        // Refused (503: too many streams) or not an event stream: poll, and try again later.
        source = null;
        startPolling();
        retryStreamTimer = setTimeout(startStream, 30000);
      } else {
        setConn("reconnecting", "pill-warn");
      }
    };
  }

  async function pollOnce() {
    try {
      const resp = await fetch("api/snapshot", {cache: "no-store"});
      if (!resp.ok) throw new Error(resp.status + " " + resp.statusText);
      receive(await resp.json());
      setConn("polling", "pill-wait");
    } catch (e) {
      setConn("offline", "pill-bad");
    }
  }

  function startPolling() {
    if (pollTimer) return;
    pollOnce();
    pollTimer = setInterval(pollOnce, Math.max(500, interval * 1000));
  }

  function stopPolling() {
    if (pollTimer) { clearInterval(pollTimer); pollTimer = null; }
  }

  startStream();
})();
