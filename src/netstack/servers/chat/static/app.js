// netstack chat: the browser client. Plain JavaScript, no build step.
// Protocol: JSON over the WebSocket at /ws (see netstack/proto/chat.py). Every command
// carries an "id" and gets one "ack" or "error" with that id; other events are pushed.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "netstack.chat.token";
const PAGE = 50;

const state = {
  ws: null,
  token: localStorage.getItem(TOKEN_KEY),
  nick: null,
  limits: { max_text_chars: 4000, max_file_bytes: 512 * 1024 },
  authed: false,
  attempt: 0,
  nextId: 1,
  pending: new Map(),          // request id -> {resolve, reject}
  lastId: 0,                   // highest message id seen: backfill starts here
  rooms: new Map(),            // name -> {name, topic, visibility, role}
  dms: new Set(),              // nicks with a DM conversation
  convs: new Map(),            // "#room" | "@nick" -> {msgs: Map, more, loaded}
  unread: new Map(),           // conversation key -> count
  online: new Set(),           // nicks seen online
  current: null,               // conversation key
  members: [],
  memberCount: 0,
  loadingOlder: false,
  blobUrls: new Map(),         // file hash -> object URL
};

// ------------------------------------------------------------------ connection

// URLs are relative to the page, so the page also works behind a proxy that mounts it
// under a prefix (`netstack up` serves it at /chat/): /chat/ -> /chat/ws, /chat/files/...
function wsUrl() {
  const url = new URL("ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.search = url.hash = "";
  return url.href;
}

function pageUrl(path) {
  return new URL(path.replace(/^\//, ""), location.href).href;
}

function connect() {
  setConn("connecting…", "");
  const ws = new WebSocket(wsUrl());
  state.ws = ws;
  ws.onmessage = (e) => {
    let event;
    try { event = JSON.parse(e.data); } catch { return; }
    onEvent(event);
  };
  ws.onclose = (e) => {
    if (state.ws !== ws) return;
    state.authed = false;
    for (const { reject } of state.pending.values()) reject({ code: "disconnected", message: "connection lost" });
    state.pending.clear();
    setComposer(false);
    if (e.code === 1008) notice(e.reason || "disconnected by the server", true);
    const delay = Math.min(30, 0.5 * 2 ** state.attempt) * (0.75 + Math.random() * 0.5);
    state.attempt += 1;
    setConn(`offline — reconnecting in ${Math.ceil(delay)} s`, "bad");
    setTimeout(connect, delay * 1000);
  };
}

function call(type, fields = {}) {
  return new Promise((resolve, reject) => {
    const ws = state.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      reject({ code: "disconnected", message: "not connected" });
      return;
    }
    const id = state.nextId++;
    state.pending.set(id, { resolve, reject });
    ws.send(JSON.stringify({ type, id, ...fields }));
  });
}

function onEvent(ev) {
  if ((ev.type === "ack" || ev.type === "error") && ev.id !== undefined && state.pending.has(ev.id)) {
    const { resolve, reject } = state.pending.get(ev.id);
    state.pending.delete(ev.id);
    (ev.type === "ack" ? resolve : reject)(ev);
    return;
  }
  const handler = handlers[ev.type];
  if (handler) handler(ev);
}

const handlers = {
  hello(ev) {
    state.limits = ev.limits;
    $("input").maxLength = ev.limits.max_text_chars;
    if (state.token) {
      call("resume", { token: state.token }).then((ack) => enter(ack), () => {
        forgetToken();
        showLogin();
      });
    } else {
      showLogin();
    }
  },
  message(ev) { addMessage(ev.message); },
  dm(ev) {
    // A live DM (not one queued while we were away) comes from someone connected now.
    if (!ev.pending && ev.message.from !== state.nick && !state.online.has(ev.message.from)) {
      state.online.add(ev.message.from);
      renderSidebar();
    }
    addMessage(ev.message);
  },
  // Batched: every presence_interval at most one per room with the membership changes
  // (to members) and one with online/offline (to sessions watching it, i.e. whose member
  // pane asked `who` about it). Room null: online/offline of our DM partners (after login
  // their state now, then their changes), whatever room is on screen.
  presence(ev) {
    for (const n of ev.online) state.online.add(n);
    for (const n of ev.offline) state.online.delete(n);
    if (state.current && state.current.startsWith("@")) renderHeader();  // "online"/"offline"
    if (ev.room === null) {
      renderSidebar();
      return;
    }
    const key = "#" + ev.room;
    if (ev.joined.length) system(key, `${nickList(ev.joined)} joined #${ev.room}`);
    if (ev.left.length) system(key, `${nickList(ev.left)} left #${ev.room}`);
    if (state.current === key) {
      // Applied here, not by asking `who` again: in a big room every member gets this
      // event, and N members each fetching N members would be O(N^2) once more.
      for (const n of ev.joined) {
        state.online.add(n);  // joining takes a live session
        if (!state.members.some((m) => m.nick === n)) {
          state.members.push({ nick: n, role: "member", online: true, muted: false });
          state.memberCount++;
        }
      }
      if (ev.left.length) {
        const before = state.members.length;
        state.members = state.members.filter((m) => !ev.left.includes(m.nick));
        state.memberCount -= before - state.members.length;
      }
      renderMembers();
    }
    renderSidebar();
  },
  kicked(ev) { removed(ev, "removed"); },
  banned(ev) { removed(ev, "banned"); },
  muted(ev) {
    const until = ev.until ? ` until ${new Date(ev.until).toLocaleTimeString()}` : "";
    system("#" + ev.room, `${ev.by} muted ${ev.nick}${until}${ev.reason ? ": " + ev.reason : ""}`);
    updateMember(ev, (m) => { m.muted = true; });
  },
  unmuted(ev) {
    system("#" + ev.room, `${ev.by} unmuted ${ev.nick}`);
    updateMember(ev, (m) => { m.muted = false; });
  },
  role(ev) {
    system("#" + ev.room, `${ev.by} made ${ev.nick} a ${ev.role}`);
    if (ev.nick === state.nick && state.rooms.has(ev.room)) state.rooms.get(ev.room).role = ev.role;
    updateMember(ev, (m) => { m.role = ev.role; });
  },
  topic(ev) {
    const room = state.rooms.get(ev.room);
    if (room) room.topic = ev.topic;
    system("#" + ev.room, `${ev.by} set the topic: ${ev.topic}`);
    renderHeader();
  },
  invited(ev) { notice(`${ev.by} invited you to #${ev.room} — type /join ${ev.room}`); },
  error(ev) { notice(ev.message, true); },
};

// A moderation event about someone in the member pane on screen: change it in place.
function updateMember(ev, change) {
  if (state.current !== "#" + ev.room) return;
  const member = state.members.find((m) => m.nick === ev.nick);
  if (member) change(member);
  renderMembers();
}

function nickList(nicks, shown = 5) {
  const more = nicks.length - shown;
  return more > 0 ? `${nicks.slice(0, shown).join(", ")} and ${more} more` : nicks.join(", ");
}

function removed(ev, verb) {
  const key = "#" + ev.room;
  if (ev.nick === state.nick) {
    state.rooms.delete(ev.room);
    notice(`${ev.by} ${verb} you from #${ev.room}${ev.reason ? ": " + ev.reason : ""}`, true);
    if (state.current === key) openConversation(firstConversation());
    renderSidebar();
  } else {
    system(key, `${ev.by} ${verb} ${ev.nick}${ev.reason ? ": " + ev.reason : ""}`);
    if (state.current === key) {
      const before = state.members.length;
      state.members = state.members.filter((m) => m.nick !== ev.nick);
      state.memberCount -= before - state.members.length;
      renderMembers();
    }
  }
}

// ------------------------------------------------------------------ sessions

async function enter(ack) {
  state.authed = true;
  state.attempt = 0;
  state.nick = ack.nick;
  if (ack.token) {
    state.token = ack.token;
    localStorage.setItem(TOKEN_KEY, ack.token);
  }
  $("me-nick").textContent = ack.nick;
  $("login").hidden = true;
  $("app").hidden = false;
  setConn("connected", "ok");
  state.online.add(ack.nick);
  const lastKey = `netstack.chat.last.${ack.nick}`;
  const dmKey = `netstack.chat.dms.${ack.nick}`;
  for (const nick of JSON.parse(localStorage.getItem(dmKey) || "[]")) state.dms.add(nick);
  // Reconnect: everything since the last message seen, page by page. Taken now: live
  // messages arriving during the calls below raise state.lastId, and backfilling from
  // there would skip what was said in between.
  let since = state.lastId || Number(localStorage.getItem(lastKey) || ack.last_id);
  if (state.lastId === 0) state.lastId = since;
  try {
    const list = await call("rooms");
    state.rooms.clear();
    for (const r of list.rooms) if (r.joined) state.rooms.set(r.name, r);
    let more = true;
    while (more) {
      const page = await call("backfill", { since, limit: 200 });
      for (const m of page.messages) { addMessage(m, true); since = Math.max(since, m.id); }
      more = page.more && page.messages.length > 0;
    }
  } catch (err) {
    notice(err.message || "could not load rooms", true);
  }
  localStorage.setItem(lastKey, String(state.lastId));
  renderSidebar();
  setComposer(true);
  if (!state.current || !conversationExists(state.current)) openConversation(firstConversation());
  else { renderMessages(); refreshMembers(); }
}

function forgetToken() {
  state.token = null;
  localStorage.removeItem(TOKEN_KEY);
}

function showLogin() {
  $("app").hidden = true;
  $("login").hidden = false;
  setConn("connected", "ok");
  $("nick").focus();
}

async function login(register) {
  const nick = $("nick").value.trim();
  const password = $("password").value;
  $("login-error").textContent = "";
  try {
    const ack = await call(register ? "register" : "login", { nick, password });
    $("password").value = "";
    resetData();
    await enter(ack);
  } catch (err) {
    $("login-error").textContent = err.message || "could not sign in";
  }
}

function resetData() {
  state.lastId = 0;
  state.rooms.clear();
  state.dms.clear();
  state.convs.clear();
  state.unread.clear();
  state.current = null;
  document.querySelectorAll(".msg, .system, .day").forEach((n) => n.remove());
}

async function logout() {
  try { await call("logout"); } catch { /* the token is forgotten anyway */ }
  forgetToken();
  state.authed = false;
  resetData();
  showLogin();
}

// ------------------------------------------------------------------ conversations

function conv(key) {
  if (!state.convs.has(key)) state.convs.set(key, { msgs: new Map(), more: true, loaded: false, system: [] });
  return state.convs.get(key);
}

function keyOf(m) {
  if (m.room) return "#" + m.room;
  return "@" + (m.from === state.nick ? m.to : m.from);
}

function conversationExists(key) {
  return key.startsWith("#") ? state.rooms.has(key.slice(1)) : true;
}

function firstConversation() {
  const rooms = [...state.rooms.keys()].sort();
  if (rooms.length) return "#" + rooms[0];
  const dms = [...state.dms].sort();
  return dms.length ? "@" + dms[0] : null;
}

function addMessage(m, quiet = false) {
  const key = keyOf(m);
  const c = conv(key);
  if (c.msgs.has(m.id)) return;   // backfill and live delivery may overlap: ids dedupe
  c.msgs.set(m.id, m);
  if (m.id > state.lastId) {
    state.lastId = m.id;
    if (state.nick) localStorage.setItem(`netstack.chat.last.${state.nick}`, String(m.id));
  }
  if (!m.room) rememberDm(key.slice(1));
  if (key === state.current) {
    appendMessageNode(m);
  } else if (m.from !== state.nick) {
    state.unread.set(key, (state.unread.get(key) || 0) + 1);
    renderSidebar();
  }
  if (!quiet && key !== state.current && m.from !== state.nick && document.hidden === false) {
    // a quiet nudge in the title
    document.title = `(${[...state.unread.values()].reduce((a, b) => a + b, 0)}) netstack chat`;
  }
}

function rememberDm(nick) {
  if (state.dms.has(nick)) return;
  state.dms.add(nick);
  localStorage.setItem(`netstack.chat.dms.${state.nick}`, JSON.stringify([...state.dms]));
  renderSidebar();
}

function system(key, text) {
  const c = conv(key);
  const entry = { system: true, text, ts: Date.now(), id: null };
  c.system.push(entry);
  if (key === state.current) appendSystemNode(entry);
}

async function openConversation(key) {
  state.current = key;
  state.unread.delete(key);
  document.title = "netstack chat";
  renderSidebar();
  renderHeader();
  $("empty").hidden = !!key;
  renderMessages();
  setComposer(!!key && state.authed);
  if (!key) return;
  const c = conv(key);
  if (!c.loaded) {
    c.loaded = true;
    await loadOlder(key);
  }
  refreshMembers();
  $("input").focus();
}

async function loadOlder(key) {
  const c = conv(key);
  if (!c.more || state.loadingOlder) return;
  state.loadingOlder = true;
  $("history-top").textContent = "Loading earlier messages…";
  const ids = [...c.msgs.keys()];
  const fields = key.startsWith("#") ? { room: key.slice(1) } : { with: key.slice(1) };
  if (ids.length) fields.before = Math.min(...ids);
  fields.limit = PAGE;
  const box = $("messages");
  const fromBottom = box.scrollHeight - box.scrollTop;
  try {
    const page = await call("history", fields);
    for (const m of page.messages) {
      c.msgs.set(m.id, m);
      if (m.id > state.lastId) state.lastId = m.id;
    }
    c.more = page.more;
  } catch (err) {
    c.more = false;
    notice(err.message, true);
  }
  state.loadingOlder = false;
  if (state.current === key) {
    renderMessages();
    box.scrollTop = box.scrollHeight - fromBottom;   // keep the reader's place
  }
}

async function refreshMembers() {
  const key = state.current;
  if (!key || !key.startsWith("#")) {
    $("app").classList.add("no-members");
    return;
  }
  $("app").classList.remove("no-members");
  try {
    // Asking `who` also makes the server send this room's online/offline changes.
    const who = await call("who", { room: key.slice(1) });
    if (state.current !== key) return;
    state.members = who.members;
    state.memberCount = who.count;  // more than listed in a very big room (online first)
    for (const m of who.members) (m.online ? state.online.add(m.nick) : state.online.delete(m.nick));
    renderMembers();
    renderSidebar();
  } catch { /* not allowed to see it: leave the list */ }
}

// The member pane from the last `who` and the online set kept up by presence events.
function renderMembers() {
  const members = (state.members || []).map((m) => ({ ...m, online: state.online.has(m.nick) }));
  $("member-list").replaceChildren(...members
    .sort((a, b) => (b.online - a.online) || a.nick.localeCompare(b.nick))
    .map((m) => {
      const li = el("li", {}, [el("span", { class: "dot" + (m.online ? " online" : "") }), m.nick]);
      if (m.role !== "member" || m.muted) {
        li.append(el("span", { class: "role" }, [m.muted ? "muted" : m.role]));
      }
      li.title = m.nick === state.nick ? "you" : `Message ${m.nick}`;
      li.onclick = () => { if (m.nick !== state.nick) { rememberDm(m.nick); openConversation("@" + m.nick); } };
      return li;
    }));
  const hidden = state.memberCount - members.length;
  if (hidden > 0) $("member-list").append(el("li", { class: "more" }, [`and ${hidden} more`]));
}

// ------------------------------------------------------------------ rendering

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
}

function color(nick) {
  let h = 0;
  for (const ch of nick) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return `hsl(${h % 360} 55% 45%)`;
}

function avatar(nick) {
  const node = el("div", { class: "avatar" }, [nick[0].toUpperCase()]);
  node.style.background = color(nick);   // CSSOM, not a style attribute: the CSP allows it
  return node;
}

function renderSidebar() {
  const rooms = [...state.rooms.values()].sort((a, b) => a.name.localeCompare(b.name));
  $("room-list").replaceChildren(...rooms.map((r) => item("#" + r.name, (r.visibility === "invite" ? "🔒 " : "# ") + r.name)));
  const dms = [...state.dms].sort();
  $("dm-list").replaceChildren(...dms.map((n) => {
    const li = item("@" + n, n);
    li.prepend(el("span", { class: "dot" + (state.online.has(n) ? " online" : "") }));
    return li;
  }));
}

function item(key, label) {
  const li = el("li", {}, [label]);
  if (key === state.current) li.classList.add("active");
  const count = state.unread.get(key);
  if (count) {
    li.classList.add("unread");
    li.append(el("span", { class: "badge" }, [String(count)]));
  }
  li.onclick = () => openConversation(key);
  return li;
}

function renderHeader() {
  const key = state.current;
  if (!key) {
    $("chan-title").textContent = "Welcome";
    $("chan-topic").textContent = "";
    return;
  }
  if (key.startsWith("#")) {
    const room = state.rooms.get(key.slice(1));
    $("chan-title").textContent = key;
    $("chan-topic").textContent = room ? room.topic : "";
    $("input").placeholder = `Message ${key}`;
  } else {
    $("chan-title").textContent = key.slice(1);
    $("chan-topic").textContent = state.online.has(key.slice(1)) ? "online" : "offline";
    $("input").placeholder = `Message ${key.slice(1)}`;
  }
}

function renderMessages() {
  const box = $("messages");
  box.querySelectorAll(".msg, .system, .day").forEach((n) => n.remove());
  const key = state.current;
  if (!key) return;
  const c = conv(key);
  const entries = [...c.msgs.values(), ...c.system].sort((a, b) => a.ts - b.ts || (a.id || 0) - (b.id || 0));
  state.prev = null;
  for (const e of entries) (e.system ? appendSystemNode(e, false) : appendMessageNode(e, false));
  $("history-top").textContent = c.more ? "Scroll up for earlier messages" : "This is the beginning of the conversation.";
  box.scrollTop = box.scrollHeight;
}

function dayLabel(ts) {
  return new Date(ts).toLocaleDateString(undefined, { weekday: "long", month: "long", day: "numeric" });
}

function maybeDay(ts) {
  const label = dayLabel(ts);
  if (!state.prev || state.prev.day !== label) $("messages").append(el("div", { class: "day" }, [label]));
  return label;
}

function appendMessageNode(m, scroll = true) {
  const box = $("messages");
  const stick = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  const day = maybeDay(m.ts);
  const cont = state.prev && state.prev.from === m.from && state.prev.day === day && m.ts - state.prev.ts < 5 * 60 * 1000;
  const time = el("time", { datetime: new Date(m.ts).toISOString() }, [new Date(m.ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })]);
  const body = el("div", { class: "body" }, [m.text]);
  const node = el("div", { class: "msg" + (cont ? " cont" : ""), "data-id": String(m.id) }, [
    avatar(m.from),
    el("div", {}, [el("div", { class: "meta" }, [el("span", { class: "from" }, [m.from]), time]), body]),
  ]);
  body.hidden = !m.text;
  if (m.file) body.after(fileNode(m.file));
  box.append(node);
  state.prev = { from: m.from, ts: m.ts, day };
  if (scroll && stick) box.scrollTop = box.scrollHeight;
}

function appendSystemNode(entry, scroll = true) {
  const box = $("messages");
  state.prev = { from: null, ts: entry.ts, day: maybeDay(entry.ts) };
  box.append(el("div", { class: "system" }, [entry.text]));
  if (scroll) box.scrollTop = box.scrollHeight;
}

function fileNode(file) {
  const a = el("a", { class: "file", href: "#", title: `${file.name} (${formatSize(file.size)})` });
  a.append(`📄 ${file.name} · ${formatSize(file.size)}`);
  a.onclick = async (e) => {
    e.preventDefault();
    const url = await fileUrl(file);
    if (!url) return;
    const link = el("a", { href: url, download: file.name });
    link.click();
  };
  if (file.mime.startsWith("image/")) {
    fileUrl(file).then((url) => {
      if (url) a.replaceChildren(el("img", { src: url, alt: file.name }));
    });
  }
  return a;
}

async function fileUrl(file) {
  if (state.blobUrls.has(file.hash)) return state.blobUrls.get(file.hash);
  try {
    const res = await fetch(pageUrl(file.url), { headers: { Authorization: `Bearer ${state.token}` } });
    if (!res.ok) throw new Error(`download failed (${res.status})`);
    const url = URL.createObjectURL(await res.blob());
    state.blobUrls.set(file.hash, url);
    return url;
  } catch (err) {
    notice(err.message, true);
    return null;
  }
}

function formatSize(n) {
  return n < 1024 ? `${n} B` : n < 1 << 20 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / (1 << 20)).toFixed(1)} MiB`;
}

let noticeTimer = null;
function notice(text, bad = false) {
  const n = $("notice");
  n.textContent = text;
  n.classList.toggle("bad", bad);
  n.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { n.hidden = true; }, 5000);
}

function setConn(text, cls) {
  const n = $("conn-state");
  n.textContent = text;
  n.className = "conn-state " + cls;
}

function setComposer(on) {
  $("input").disabled = !on || !state.current;
  $("send-btn").disabled = !on || !state.current;
}

// ------------------------------------------------------------------ sending

const HELP = [
  "/join ROOM · /leave · /create ROOM [invite] · /invite NICK · /who · /topic TEXT",
  "/msg NICK TEXT · /kick NICK [reason] · /ban NICK [reason] · /unban NICK",
  "/mute NICK [seconds] · /unmute NICK · /op NICK · /deop NICK",
].join("\n");

async function submit() {
  const input = $("input");
  const text = input.value;
  if (!text.trim()) return;
  const key = state.current;
  const room = key && key.startsWith("#") ? key.slice(1) : null;
  try {
    if (text.startsWith("/")) {
      await command(text.trim(), room);
    } else if (room) {
      await call("say", { room, text });
    } else if (key) {
      await call("dm", { to: key.slice(1), text });
    }
    input.value = "";
    autosize();
  } catch (err) {
    notice(err.message || "failed", true);
  }
}

async function command(line, room) {
  const [cmd, ...args] = line.split(/\s+/);
  const rest = (n) => args.slice(n).join(" ");
  const needRoom = () => { if (!room) throw { message: "open a channel first" }; return room; };
  switch (cmd) {
    case "/help": notice(HELP); return;
    case "/join": {
      const ack = await call("join", { room: args[0] });
      state.rooms.set(ack.room.name, ack.room);
      renderSidebar();
      openConversation("#" + ack.room.name);
      return;
    }
    case "/leave": {
      const name = args[0] || needRoom();
      await call("leave", { room: name });
      state.rooms.delete(name);
      openConversation(firstConversation());
      return;
    }
    case "/create": {
      await createRoom(args[0], args[1] === "invite", rest(2));
      return;
    }
    case "/invite": await call("invite", { room: needRoom(), nick: args[0] }); notice(`invited ${args[0]}`); return;
    case "/who": refreshMembers(); return;
    case "/topic": await call("topic", { room: needRoom(), topic: rest(0) }); return;
    case "/msg": case "/dm": {
      await call("dm", { to: args[0], text: rest(1) });
      rememberDm(args[0]);
      openConversation("@" + args[0]);
      return;
    }
    case "/kick": await call("kick", withReason({ room: needRoom(), nick: args[0] }, rest(1))); return;
    case "/ban": await call("ban", withReason({ room: needRoom(), nick: args[0] }, rest(1))); return;
    case "/unban": await call("unban", { room: needRoom(), nick: args[0] }); notice(`unbanned ${args[0]}`); return;
    case "/mute": {
      const fields = { room: needRoom(), nick: args[0] };
      if (args[1]) fields.seconds = Number(args[1]);
      await call("mute", fields);
      return;
    }
    case "/unmute": await call("unmute", { room: needRoom(), nick: args[0] }); return;
    case "/op": await call("set_role", { room: needRoom(), nick: args[0], role: "moderator" }); return;
    case "/deop": await call("set_role", { room: needRoom(), nick: args[0], role: "member" }); return;
    default: throw { message: `unknown command ${cmd}; try /help` };
  }
}

function withReason(fields, reason) {
  if (reason) fields.reason = reason;
  return fields;
}

async function createRoom(name, invite, topic) {
  const fields = { room: name, visibility: invite ? "invite" : "public" };
  if (topic) fields.topic = topic;
  const ack = await call("create", fields);
  state.rooms.set(ack.room.name, ack.room);
  renderSidebar();
  openConversation("#" + ack.room.name);
}

async function shareFile(file) {
  if (!file) return;
  if (file.size > state.limits.max_file_bytes) {
    notice(`${file.name} is larger than ${formatSize(state.limits.max_file_bytes)}`, true);
    return;
  }
  const data = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
  const fields = { name: file.name.replace(/[\/\\]/g, "_").slice(0, 200) || "file", data };
  if (/^[a-z0-9][a-z0-9.+-]{0,40}\/[a-z0-9][a-z0-9.+-]{0,60}$/.test(file.type)) fields.mime = file.type;
  try {
    const up = await call("upload", fields);
    const key = state.current;
    const text = $("input").value;
    if (key.startsWith("#")) await call("say", { room: key.slice(1), text, file: up.file.hash });
    else await call("dm", { to: key.slice(1), text, file: up.file.hash });
    $("input").value = "";
  } catch (err) {
    notice(err.message, true);
  }
}

async function openBrowse() {
  $("browse-error").textContent = "";
  const list = $("browse-list");
  list.replaceChildren(el("li", {}, ["Loading…"]));
  $("browse").showModal();
  try {
    const ack = await call("rooms");
    list.replaceChildren(...ack.rooms.map((r) => {
      const btn = el("button", { type: "button" }, [r.joined ? "Open" : "Join"]);
      btn.onclick = async () => {
        try {
          if (!r.joined) {
            const j = await call("join", { room: r.name });
            state.rooms.set(j.room.name, j.room);
            renderSidebar();
          }
          $("browse").close();
          openConversation("#" + r.name);
        } catch (err) { $("browse-error").textContent = err.message; }
      };
      return el("li", {}, [
        el("div", { class: "grow" }, [el("strong", {}, [(r.visibility === "invite" ? "🔒 " : "# ") + r.name]),
          el("div", {}, [`${r.members} member${r.members === 1 ? "" : "s"}${r.topic ? " · " + r.topic : ""}`])]),
        btn,
      ]);
    }));
    if (!ack.rooms.length) list.replaceChildren(el("li", {}, ["No channels yet: create the first one."]));
  } catch (err) {
    $("browse-error").textContent = err.message;
  }
}

function autosize() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = Math.min(input.scrollHeight, 180) + "px";
}

// ------------------------------------------------------------------ wiring

function wire() {
  $("login-form").addEventListener("submit", (e) => { e.preventDefault(); login(false); });
  $("register-btn").addEventListener("click", () => {
    if ($("login-form").reportValidity()) login(true);
  });
  $("logout-btn").addEventListener("click", logout);
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); submit(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submit(); }
  });
  $("input").addEventListener("input", autosize);
  $("attach-btn").addEventListener("click", () => $("file-input").click());
  $("file-input").addEventListener("change", (e) => { shareFile(e.target.files[0]); e.target.value = ""; });
  $("messages").addEventListener("scroll", () => {
    if ($("messages").scrollTop < 60 && state.current) loadOlder(state.current);
  });
  $("browse-btn").addEventListener("click", openBrowse);
  $("create-btn").addEventListener("click", async () => {
    try {
      await createRoom($("new-room").value.trim(), $("new-private").checked, $("new-topic").value.trim());
      $("browse").close();
      $("new-room").value = "";
      $("new-topic").value = "";
    } catch (err) { $("browse-error").textContent = err.message; }
  });
  $("new-dm-btn").addEventListener("click", () => { $("dm-nick").value = ""; $("dm-dialog").showModal(); });
  $("dm-open-btn").addEventListener("click", () => {
    const nick = $("dm-nick").value.trim();
    if (!nick) return;
    $("dm-dialog").close();
    rememberDm(nick);
    openConversation("@" + nick);
  });
  $("members-btn").addEventListener("click", () => $("app").classList.toggle("no-members"));
  document.addEventListener("visibilitychange", () => { if (!document.hidden) document.title = "netstack chat"; });
}

wire();
connect();
