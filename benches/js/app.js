// The benchmark app: a small Hono service. fetch.js and reuse.js wrap it
// in the two ways StarlingMonkey can serve wasi:http (see build.sh).
import { Hono } from "hono";

export const app = new Hono();

app.get("/", (c) => c.text("hello from hono\n"));

app.get("/json", (c) =>
  c.json({ service: "wasmpool-bench", framework: "hono", ok: true, items: [1, 2, 3] })
);

app.get("/user/:id", (c) => c.json({ id: c.req.param("id"), name: `user ${c.req.param("id")}` }));

app.post("/echo", async (c) => {
  const body = await c.req.arrayBuffer();
  return c.body(body, 200, {
    "content-type": c.req.header("content-type") ?? "application/octet-stream",
  });
});

export default app;
