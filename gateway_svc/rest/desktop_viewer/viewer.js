// The live desktop viewer: noVNC connected to the gateway's desktop stream of one instance.
// The viewer token (CreateDesktopViewerUrl) is in the URL's fragment, which the browser never
// sends anywhere; it travels as a WebSocket subprotocol. Without one, the stream admits whatever
// else the browser presents (the console's session). View-only is enforced by the gateway; the
// page only stops sending what would be dropped anyway.
import RFB from "__NOVNC__/core/rfb.js";

const fragment = new URLSearchParams(location.hash.slice(1));
const token = fragment.get("token") || "";
const instance = decodeURIComponent(location.pathname.split("/")[2] || "");
const viewOnly = tokenViewOnly(token) ?? fragment.get("view_only") === "1";
const statusEl = document.getElementById("status");
const state = { connected: false, everConnected: false, disconnects: 0, error: "", rfb: null };
window.cyberdeskViewer = state; // read by tests and by the console's page around an iframe

document.getElementById("instance").textContent = instance;
document.getElementById("mode").textContent = viewOnly ? "view only" : "control";

function tokenViewOnly(value) {
  // The token's payload is readable JSON (signed, not secret to its holder): {"v": view_only, ...}.
  try {
    const payload = value.split(".")[0].replace(/-/g, "+").replace(/_/g, "/");
    return Boolean(JSON.parse(atob(payload)).v);
  } catch {
    return null;
  }
}

function show(text, error = false) {
  statusEl.textContent = text;
  statusEl.className = error ? "error" : "";
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const url = `${scheme}//${location.host}/v1/instances/${encodeURIComponent(instance)}/desktop:stream`;
  const protocols = ["binary"];
  if (token) protocols.push(`cyberdesk.viewer.${token}`);
  const rfb = new RFB(document.getElementById("screen"), url, { wsProtocols: protocols, shared: true });
  rfb.viewOnly = viewOnly;
  rfb.scaleViewport = true;
  rfb.resizeSession = false;
  rfb.focusOnClick = !viewOnly;
  state.rfb = rfb;
  rfb.addEventListener("connect", () => {
    state.connected = true;
    state.everConnected = true;
    state.error = "";
    show("live");
  });
  rfb.addEventListener("disconnect", (event) => {
    state.connected = false;
    state.disconnects += 1;
    if (!state.everConnected) {
      // The handshake was refused (no access, an expired link, the instance not running):
      // retrying would be refused the same way.
      state.error = "could not connect: the link may have expired, or the instance is not running";
      show(state.error, true);
      return;
    }
    state.error = event.detail.clean ? "the desktop closed the connection" : "the connection to the desktop was lost";
    if (state.disconnects < 30) {
      show(`${state.error}; reconnecting…`, true);
      setTimeout(connect, 1000);
    } else {
      show(state.error, true);
    }
  });
  rfb.addEventListener("securityfailure", (event) => {
    show(`refused: ${event.detail.reason || "security failure"}`, true);
  });
}

if (!instance) {
  show("no instance in the address", true);
} else {
  connect();
}
