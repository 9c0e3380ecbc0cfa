// Initialises the official tracker as a site would, from config.js (which the test's
// static server writes: the registered domain and flowray's /api/event), and records
// into the page what it sent and what the endpoint answered, for the test to read
// from the DOM Chromium dumps.
import { init, track } from "./vendor/plausible.js";
import { config } from "./config.js";

function note(list, fields) {
  const item = document.createElement("li");
  for (const [key, value] of Object.entries(fields)) {
    item.setAttribute(`data-${key}`, String(value));
  }
  document.getElementById(list).appendChild(item);
}

init({
  domain: config.domain,
  endpoint: config.endpoint,
  captureOnLocalhost: config.captureOnLocalhost === true,
  transformRequest: (payload) => {
    note("sent", {
      name: payload.n,
      url: payload.u,
      referrer: payload.r ?? "",
      domain: payload.d,
      props: JSON.stringify(payload.p ?? {}),
    });
    return payload;
  },
});

function signup() {
  const plan = new URLSearchParams(location.search).get("plan") ?? "free";
  track("Signup", {
    props: { plan },
    callback: (result) => {
      if (result?.status) {
        note("answers", { event: "Signup", status: result.status });
      } else {
        note("answers", { event: "Signup", error: String(result?.error ?? "ignored") });
      }
    },
  });
}

if (document.readyState === "complete") {
  signup();
} else {
  window.addEventListener("load", signup);
}
