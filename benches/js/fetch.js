// Fetch-event entry point: StarlingMonkey's built-in wasi:http glue turns
// the request into a FetchEvent. Its instances answer only their first
// request (a second respondWith on a reused instance fails), so serve this
// build with --max-instance-reuse-count 1.
import { app } from "./app.js";

addEventListener("fetch", (event) => event.respondWith(app.fetch(event.request)));
