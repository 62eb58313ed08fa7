// The NHDP dashboard: one page over the API, with the API's own tokens and rules.
// No build step. Every figure comes from an API answer and is written with textContent.
"use strict";

const TEXT = {
  vi: {
    title: "Tiêm chủng COVID-19 toàn quốc", controls: "Điều khiển", scheme: "Đơn vị hành chính",
    scheme2008: "63 tỉnh (2008)", scheme2025: "34 tỉnh (2025)", asOf: "Thời điểm", live: "Trực tiếp",
    signOut: "Đăng xuất", signIn: "Đăng nhập", signInButton: "Đăng nhập", token: "Mã truy cập",
    signInHelp: "Dán mã truy cập (token) của bạn; nó chỉ được giữ trong thẻ trình duyệt này.",
    back: "← Toàn quốc", progress: "Tiến độ", nation: "Toàn quốc",
    doses_administered: "Mũi đã tiêm", people_vaccinated: "Người đã tiêm",
    people_fully_vaccinated: "Người tiêm đủ liều", coverage_pct: "Độ bao phủ (≥1 mũi)",
    full_coverage_pct: "Độ bao phủ đủ liều", population: "Dân số (2019)", doses_allocated: "Vắc xin được phân bổ",
    doses_remaining: "Vắc xin còn lại", adverse: "Phản ứng sau tiêm", adverse_events: "Tất cả",
    serious_adverse_events: "Nghiêm trọng", daily: "Số mũi tiêm theo ngày", dailyByVaccine: "Số mũi tiêm theo ngày và loại vắc xin",
    byDoseNumber: "Số mũi tiêm theo ngày và mũi thứ", dailyTable: "Bảng số liệu theo ngày", csv: "Tải CSV",
    provinces: "Các tỉnh, thành phố", rank: "Hạng", code: "Mã", name: "Tỉnh, thành phố", day: "Ngày",
    vaccine: "Vắc xin", dose_number: "Mũi thứ", doses: "Số mũi", people: "Số người",
    footer: "Số liệu: NHDP. Dân số: Tổng điều tra 2019. Đơn vị 2025: Nghị quyết 202/2025/QH15.",
    updated: "Cập nhật lúc", behind: "sự kiện chưa vào số liệu", upToDate: "đã khớp với nhật ký",
    asOfBanner: "Số liệu tại thời điểm", legend: "Màu: độ bao phủ ≥1 mũi, từ 0 đến", dose: "Mũi",
    badToken: "Mã truy cập không hợp lệ", store_projections: "PostgreSQL, trực tiếp", store_analytics: "ClickHouse",
    islands: "Quần đảo",
  },
  en: {
    title: "COVID-19 vaccination, nationwide", controls: "Controls", scheme: "Provincial units",
    scheme2008: "63 provinces (2008)", scheme2025: "34 provinces (2025)", asOf: "As of", live: "Live",
    signOut: "Sign out", signIn: "Sign in", signInButton: "Sign in", token: "Access token",
    signInHelp: "Paste your access token; it is kept in this browser tab only.",
    back: "← Whole country", progress: "Progress", nation: "Whole country",
    doses_administered: "Doses administered", people_vaccinated: "People vaccinated",
    people_fully_vaccinated: "People fully vaccinated", coverage_pct: "Coverage (≥1 dose)",
    full_coverage_pct: "Full coverage", population: "Population (2019)", doses_allocated: "Doses allocated",
    doses_remaining: "Doses remaining", adverse: "Adverse events", adverse_events: "All",
    serious_adverse_events: "Serious", daily: "Doses per day", dailyByVaccine: "Doses per day by vaccine",
    byDoseNumber: "Doses per day by dose number", dailyTable: "Daily figures as a table", csv: "Download CSV",
    provinces: "Provinces", rank: "Rank", code: "Code", name: "Province", day: "Day",
    vaccine: "Vaccine", dose_number: "Dose number", doses: "Doses", people: "People",
    footer: "Figures: NHDP. Population: 2019 census. 2025 units: Resolution 202/2025/QH15.",
    updated: "Updated at", behind: "events not yet in the figures", upToDate: "up to date with the log",
    asOfBanner: "Figures as of", legend: "Colour: coverage (≥1 dose), from 0 to", dose: "Dose",
    badToken: "This token was refused", store_projections: "PostgreSQL, live", store_analytics: "ClickHouse",
    islands: "Archipelago",
  },
};
const FIGURES = ["doses_administered", "people_vaccinated", "people_fully_vaccinated", "coverage_pct",
  "full_coverage_pct", "population", "doses_allocated", "doses_remaining", "adverse_events", "serious_adverse_events"];
const LIVE_MS = 1000;  // the summaries (PostgreSQL, coalesced by the API)
const ANALYTICS_MS = 5000;  // the daily charts (ClickHouse)
const BLUES = ["#eff6fc", "#c6dbef", "#9ecae1", "#6baed6", "#3182bd", "#08519c"];
const VACCINE_COLOURS = { astrazeneca: "#4e79a7", pfizer: "#f28e2b", moderna: "#59a14f", sinopharm: "#e15759",
  janssen: "#b07aa1", sputnik_v: "#76b7b2", abdala: "#edc948", hayat_vax: "#9c755f", covaxin: "#bab0ac" };
const $ = (id) => document.getElementById(id);

const state = {
  token: sessionStorage.getItem("nhdp-token"),
  lang: localStorage.getItem("nhdp-lang") || "vi",
  me: null, scheme: "2008", asOf: null, province: null,
  tiles: null, rows: [], daily: [], timer: null, analyticsAt: 0, seq: 0, charts: {},
};
// For the browser tests and bench/bench_dashboard.py: when figures were first drawn and last changed.
// `seen`: when each live summary was drawn and the log positions it reflects (NHDP-Positions).
window.nhdp = { firstRender: null, renders: 0, changes: [], seen: [] };

const t = (key) => TEXT[state.lang][key] ?? key;
const fmt = (v, figure) => {
  if (v === null || v === undefined) return "–";
  const locale = state.lang === "vi" ? "vi-VN" : "en-GB";
  if (figure && figure.endsWith("_pct")) return v.toLocaleString(locale, { maximumFractionDigits: 3 }) + " %";
  return v.toLocaleString(locale);
};

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, params = {}) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== null && v !== undefined && v !== ""));
  const url = query.toString() ? `${path}?${query}` : path;
  const reply = await fetch(url, { headers: { Authorization: `Bearer ${state.token}` }, cache: "no-store" });
  let body = null;
  try { body = await reply.json(); } catch { body = null; }
  if (!reply.ok) throw new ApiError(reply.status, (body && body.error) || `${reply.status} ${reply.statusText}`);
  return { body, headers: reply.headers };
}

// -- language ------------------------------------------------------------------------------------------
function applyLanguage() {
  document.documentElement.lang = state.lang;
  document.title = `NHDP — ${t("title")}`;
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll("[data-i18n-aria]")) el.setAttribute("aria-label", t(el.dataset.i18nAria));
  const other = state.lang === "vi" ? "en" : "vi";
  $("lang").textContent = other === "en" ? "English" : "Tiếng Việt";
  $("lang").lang = other;
}

// -- the address: #province=79&scheme=2025&as_of=... , so a view can be shared and reloaded ------------
function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  state.scheme = h.get("scheme") === "2025" ? "2025" : "2008";
  state.province = h.get("province") || null;
  state.asOf = h.get("as_of") || null;
}
function writeHash() {
  const h = new URLSearchParams();
  if (state.province && state.me.role !== "province") h.set("province", state.province);
  if (state.scheme !== "2008") h.set("scheme", state.scheme);
  if (state.asOf) h.set("as_of", state.asOf);
  history.replaceState(null, "", h.toString() ? `#${h}` : location.pathname);
}

// -- sign-in -------------------------------------------------------------------------------------------
async function signIn(token) {
  state.token = token.trim();
  try {
    state.me = (await api("/v1/me")).body;
  } catch (e) {
    state.token = null;
    sessionStorage.removeItem("nhdp-token");
    $("signin").hidden = false;
    $("board").hidden = true;
    $("signin-error").textContent = `${t("badToken")}: ${e.message}`;
    return;
  }
  sessionStorage.setItem("nhdp-token", state.token);
  $("signin").hidden = true;
  $("board").hidden = false;
  $("sign-out").hidden = false;
  const national = state.me.rights.includes("read:all");
  $("provinces").hidden = !national;
  $("scheme").disabled = !national;  // a province reads its own 2008 unit
  if (!national) { state.province = state.me.province; state.scheme = "2008"; }
  $("scheme").value = state.scheme;
  $("as-of").value = state.asOf ? toLocalInput(state.asOf) : "";
  await refresh(true);
}

function signOut() {
  sessionStorage.removeItem("nhdp-token");
  clearTimeout(state.timer);
  state.token = state.me = null;
  location.hash = "";
  location.reload();
}

// -- time travel ---------------------------------------------------------------------------------------
function toLocalInput(iso) {
  const d = new Date(iso);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}
function setAsOf(value) {
  state.asOf = value ? new Date(value).toISOString() : null;
  $("as-of").value = value ? toLocalInput(state.asOf) : "";
  writeHash();
  refresh(true);
}

// -- loading and drawing -------------------------------------------------------------------------------
async function refresh(all = false) {
  clearTimeout(state.timer);
  const seq = ++state.seq;
  const params = { scheme: state.scheme === "2008" ? null : state.scheme, as_of: state.asOf };
  const national = state.me.rights.includes("read:all");
  try {
    const summaryPath = state.province ? `/v1/provinces/${encodeURIComponent(state.province)}/summary` : "/v1/national/summary";
    const calls = [api(summaryPath, params)];
    if (national) calls.push(api("/v1/provinces", params));
    const [summary, provinces] = await Promise.all(calls);
    if (seq !== state.seq) return;  // a newer refresh (another scheme, province or time) has started
    if (provinces) state.rows = provinces.body;
    drawSummary(summary.body);
    if (national) { drawTiles(); drawRanking(); }
    drawFreshness(summary.headers);
    $("error").textContent = "";
    if (all || Date.now() - state.analyticsAt >= ANALYTICS_MS) {
      state.analyticsAt = Date.now();
      await loadDaily(params, seq);
    }
    window.nhdp.renders += 1;
    if (window.nhdp.firstRender === null) window.nhdp.firstRender = performance.now();
    document.body.dataset.rendered = String(window.nhdp.renders);
  } catch (e) {
    if (e.status === 401) { signOut(); return; }
    $("error").textContent = e.message;
  } finally {
    if (seq === state.seq && !state.asOf) state.timer = setTimeout(() => refresh(false), LIVE_MS);
  }
}

function drawSummary(s) {
  const name = state.province ? `${s.name} (${s.province_code})` : t("nation");
  $("scope").textContent = name;
  $("back").hidden = !state.province || state.me.role === "province";
  for (const el of document.querySelectorAll("[data-figure]")) {
    const figure = el.dataset.figure;
    const value = s[figure];
    if (el.dataset.value !== String(value)) {
      if (el.dataset.value !== undefined) window.nhdp.changes.push({ figure, value, at: performance.timeOrigin + performance.now() });
      el.dataset.value = String(value);
    }
    el.textContent = fmt(value, figure);
  }
  document.querySelector(".kpi.serious").classList.toggle("alert", s.serious_adverse_events > 0);
  $("coverage-bar").style.width = `${Math.min(100, s.coverage_pct)}%`;
  $("full-bar").style.width = `${Math.min(100, s.full_coverage_pct)}%`;
  const banner = $("as-of-banner");
  banner.hidden = !state.asOf;
  if (state.asOf) banner.textContent = `${t("asOfBanner")} ${new Date(state.asOf).toLocaleString(state.lang === "vi" ? "vi-VN" : "en-GB", { timeZone: "Asia/Ho_Chi_Minh" })} (UTC+7)`;
}

function drawFreshness(headers) {
  const lag = headers.get("NHDP-Lag");
  const store = headers.get("NHDP-Store") || "";
  const now = new Date().toLocaleTimeString(state.lang === "vi" ? "vi-VN" : "en-GB");
  const behind = lag === null || lag === "unknown" ? "?" : Number(lag);
  const el = $("freshness");
  el.dataset.lag = String(behind);
  const positions = headers.get("NHDP-Positions");
  if (positions !== null && !state.asOf) {
    window.nhdp.seen.push({ at: performance.timeOrigin + performance.now(), positions });
    if (window.nhdp.seen.length > 600) window.nhdp.seen.shift();
  }
  el.classList.toggle("stale", behind !== 0);
  el.textContent = state.asOf
    ? `${t("asOfBanner")} ${state.asOf} · ${t("store_" + store)}`
    : `${t("updated")} ${now} · ${behind === 0 ? t("upToDate") : `${fmt(behind)} ${t("behind")}`} · ${t("store_" + store)}`;
}

function colour(pct, max) {
  const i = max > 0 ? Math.min(BLUES.length - 1, Math.floor((pct / max) * BLUES.length)) : 0;
  return { bg: BLUES[i], fg: i >= 3 ? "#ffffff" : "#0b1f33" };
}

function initials(name) {
  const words = name.replace(/^Thành phố /, "").split(/[\s–-]+/).filter(Boolean);
  return words.map((w) => w[0]).join("").slice(0, 3).toUpperCase();
}

function drawTiles() {
  const box = $("tiles");
  box.replaceChildren();
  const layout = state.tiles;
  box.style.gridTemplateColumns = `repeat(${layout.columns}, var(--tile))`;
  const max = Math.max(0.001, ...state.rows.map((r) => r.coverage_pct));  // the scale spans what is there
  for (const row of state.rows) {
    const at = layout.tiles[row.province_code];
    if (!at) continue;
    const b = document.createElement("button");
    b.type = "button";
    b.className = "tile" + (row.province_code === state.province ? " selected" : "");
    b.dataset.code = row.province_code;
    b.dataset.coverage = String(row.coverage_pct);
    b.style.gridColumn = String(at[0] + 1);
    b.style.gridRow = String(at[1] + 1);
    const c = colour(row.coverage_pct, max);
    b.style.background = c.bg;
    b.style.color = c.fg;
    b.title = `${row.name} (${row.province_code}): ${fmt(row.coverage_pct, "coverage_pct")}`;
    const abbr = document.createElement("span");
    abbr.textContent = initials(row.name);
    const pct = document.createElement("small");
    pct.textContent = row.coverage_pct.toFixed(row.coverage_pct < 10 ? 2 : 1);
    b.append(abbr, " ", pct);
    // the accessible name starts with what the tile shows (WCAG 2.5.3), then says it in full
    b.setAttribute("aria-label", `${abbr.textContent} ${pct.textContent}: ${b.title}`);
    b.addEventListener("click", () => openProvince(row.province_code));
    box.append(b);
  }
  for (const island of layout.islands) {
    const unit = state.rows.find((r) => r.province_code === island.unit);  // 48 and 56 are codes in both schemes
    const s = document.createElement("span");
    s.className = "island";
    s.style.gridColumn = String(island.tile[0] + 1);
    s.style.gridRow = String(island.tile[1] + 1);
    s.textContent = island.name;
    s.title = `${t("islands")} ${island.name}${unit ? ` (${unit.name})` : ""}`;
    box.append(s);
  }
  $("legend").textContent = `${t("legend")} ${fmt(max, "coverage_pct")} · ${t("scheme" + state.scheme)}`;
}

function ranked(rows) {
  const sorted = [...rows].sort((a, b) => b.coverage_pct - a.coverage_pct || a.province_code.localeCompare(b.province_code));
  let rank = 0;
  return sorted.map((r, i) => {
    if (i === 0 || r.coverage_pct !== sorted[i - 1].coverage_pct) rank = i + 1;
    return { rank, ...r };
  });
}

const RANKING_COLUMNS = ["rank", "province_code", "name", "population", "people_vaccinated", "coverage_pct",
  "people_fully_vaccinated", "full_coverage_pct", "doses_administered", "serious_adverse_events"];

function drawRanking() {
  const table = $("ranking");
  const head = document.createElement("tr");
  for (const c of RANKING_COLUMNS) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = t(c === "province_code" ? "code" : c);
    head.append(th);
  }
  table.tHead.replaceChildren(head);
  const body = [];
  for (const r of ranked(state.rows)) {
    const tr = document.createElement("tr");
    tr.dataset.code = r.province_code;
    if (r.province_code === state.province) tr.className = "selected";
    for (const c of RANKING_COLUMNS) {
      const td = document.createElement("td");
      td.dataset.column = c;
      td.dataset.value = String(r[c]);
      if (c === "name") {
        const a = document.createElement("a");
        a.href = `#province=${r.province_code}`;
        a.textContent = r.name;
        a.addEventListener("click", (ev) => { ev.preventDefault(); openProvince(r.province_code); });
        td.append(a);
      } else {
        td.textContent = c === "province_code" ? r[c] : fmt(r[c], c);
      }
      if (c === "serious_adverse_events" && r[c] > 0) td.className = "alert";
      tr.append(td);
    }
    body.push(tr);
  }
  table.tBodies[0].replaceChildren(...body);
}

async function loadDaily(params, seq) {
  const filter = { ...params, province: state.province };
  const [byVaccine, byNumber] = await Promise.all([
    api("/v1/analytics/doses", { ...filter, group_by: "day,vaccine" }),
    api("/v1/analytics/doses", { ...filter, group_by: "day,dose_number" }),
  ]);
  if (seq !== state.seq) return;
  state.daily = byVaccine.body.rows;
  drawChart("chart-vaccine", byVaccine.body.rows, "vaccine", t("dailyByVaccine"));
  drawChart("chart-number", byNumber.body.rows, "dose_number", t("byDoseNumber"));
  drawDailyTable(byVaccine.body.rows);
}

function everyDay(listed) {
  // every day from the first to the last, so that a day without doses shows as a gap, not as nothing
  const sorted = [...new Set(listed)].sort();
  if (!sorted.length) return [];
  const out = [];
  for (let d = new Date(`${sorted[0]}T00:00:00Z`); d <= new Date(`${sorted.at(-1)}T00:00:00Z`); d.setUTCDate(d.getUTCDate() + 1)) {
    out.push(d.toISOString().slice(0, 10));
  }
  return out;
}

function drawChart(id, rows, key, title) {
  if (!window.echarts) return;
  const days = everyDay(rows.map((r) => r.day));
  const keys = [...new Set(rows.map((r) => String(r[key])))].sort();
  const index = new Map(days.map((d, i) => [d, i]));
  const series = keys.map((k) => {
    const data = new Array(days.length).fill(0);
    for (const r of rows) if (String(r[key]) === k) data[index.get(r.day)] += r.doses;
    const colour = key === "vaccine" ? VACCINE_COLOURS[k] : undefined;  // one colour per vaccine in every view
    return { name: key === "dose_number" ? `${t("dose")} ${k}` : k, type: "bar", stack: "all", data, itemStyle: colour && { color: colour } };
  });
  let chart = state.charts[id];
  if (!chart) chart = state.charts[id] = echarts.init($(id), null, { renderer: "svg" });
  chart.setOption({
    animation: false,
    title: { text: title, textStyle: { fontSize: 14 } },
    tooltip: { trigger: "axis" },
    legend: { top: 26, type: "scroll" },
    grid: { top: 64, left: 60, right: 20, bottom: 30 },
    xAxis: { type: "category", data: days },
    yAxis: { type: "value" },
    series,
  }, true);
  $(id).setAttribute("aria-label", `${title}: ${rows.reduce((n, r) => n + r.doses, 0)} ${t("doses")}`);
}

function drawDailyTable(rows) {
  const table = $("daily-table");
  const head = document.createElement("tr");
  for (const c of ["day", "vaccine", "doses", "people"]) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = t(c);
    th.dataset.column = c;
    head.append(th);
  }
  table.tHead.replaceChildren(head);
  table.tBodies[0].replaceChildren(...rows.map((r) => {
    const tr = document.createElement("tr");
    for (const c of ["day", "vaccine", "doses", "people"]) {
      const td = document.createElement("td");
      td.dataset.column = c;
      td.dataset.value = String(r[c]);
      td.textContent = typeof r[c] === "number" ? fmt(r[c]) : r[c];
      tr.append(td);
    }
    return tr;
  }));
}

function openProvince(code) {
  state.province = code;
  writeHash();
  refresh(true);
}

// -- CSV: the table's own values (not the formatted text), UTF-8 with a BOM for spreadsheet programs ----
function csvCell(value) {
  let s = String(value ?? "");
  if (/^[=+\-@\t\r]/.test(s)) s = `'${s}`;  // never a formula in a spreadsheet
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}
function downloadCsv(tableId) {
  const table = $(tableId);
  const headers = [...table.tHead.rows[0].cells].map((c) => c.textContent);
  const lines = [headers.map(csvCell).join(",")];
  for (const tr of table.tBodies[0].rows) lines.push([...tr.cells].map((td) => csvCell(td.dataset.value)).join(","));
  const stamp = (state.asOf || new Date().toISOString()).replace(/[:.]/g, "-");
  const scope = state.province ? `province-${state.province}` : "nation";
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob(["\ufeff" + lines.join("\r\n") + "\r\n"], { type: "text/csv;charset=utf-8" }));
  a.download = `nhdp-${tableId}-${scope}-${state.scheme}-${stamp}.csv`;
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

// -- start ---------------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", async () => {
  applyLanguage();
  readHash();
  state.tiles = await (await fetch("/dashboard/static/tiles.json")).json();
  $("signin-form").addEventListener("submit", (ev) => { ev.preventDefault(); signIn($("token").value); });
  $("sign-out").addEventListener("click", signOut);
  $("lang").addEventListener("click", () => {
    state.lang = state.lang === "vi" ? "en" : "vi";
    localStorage.setItem("nhdp-lang", state.lang);
    applyLanguage();
    if (state.me) refresh(true);
  });
  $("scheme").addEventListener("change", () => {
    state.scheme = $("scheme").value;
    state.province = null;  // a code means another unit in the other scheme
    writeHash();
    refresh(true);
  });
  $("as-of").addEventListener("change", () => setAsOf($("as-of").value));
  $("live").addEventListener("click", () => setAsOf(null));
  $("back").addEventListener("click", () => openProvince(null));
  for (const b of document.querySelectorAll("[data-csv]")) b.addEventListener("click", () => downloadCsv(b.dataset.csv));
  window.addEventListener("resize", () => Object.values(state.charts).forEach((c) => c.resize()));
  if (state.token) await signIn(state.token);
});
