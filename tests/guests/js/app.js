// A componentize-js (StarlingMonkey) wasi:http guest. Its instances answer
// only their first request: on a reused instance respondWith fails
// ("FetchEvent#respondWith can't be called twice").
addEventListener("fetch", (event) => {
  event.respondWith(
    (async () => {
      const url = new URL(event.request.url);
      const body = event.request.method === "POST" ? await event.request.text() : "";
      return new Response(`hello from js: ${event.request.method} ${url.pathname} ${body}\n`);
    })()
  );
});
