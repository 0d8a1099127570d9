// Renders /openapi.json: one section per operation with its body fields (type, default, rules,
// description) and responses. Small on purpose: no CDN, no build step.
"use strict";

const el = (tag, text, cls) => {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
};

function resolve(spec, schema) {
  while (schema && schema.$ref) {
    schema = schema.$ref.replace(/^#\//, "").split("/").reduce((o, k) => o[k], spec);
  }
  return schema || {};
}

function rules(s) {
  const out = [];
  if (s.enum) out.push(`one of ${s.enum.join(", ")}`);
  if (s.const !== undefined) out.push(`must be ${JSON.stringify(s.const)}`);
  if (s.exclusiveMinimum !== undefined) {
    out.push(`> ${s.exclusiveMinimum}` + (s.maximum !== undefined ? ` and <= ${s.maximum}` : ""));
  } else if (s.minimum !== undefined || s.maximum !== undefined) {
    out.push(`${s.minimum ?? "…"}..${s.maximum ?? "…"}`);
  }
  if (s.contentEncoding) out.push(s.contentEncoding);
  if (s.format === "binary") out.push("a file");
  if (s.multipleOf) out.push(`multiple of ${s.multipleOf}`);
  if (s.maxLength !== undefined) out.push(`at most ${s.maxLength} characters`);
  if (s.pattern) out.push(s.pattern === "\\S" ? "not blank" : `matches ${s.pattern}`);
  return out.join("; ");
}

function fieldTable(spec, schema) {
  schema = resolve(spec, schema);
  const props = schema.properties || {};
  if (!Object.keys(props).length) return null;
  const required = new Set(schema.required || []);
  const table = el("table");
  const head = table.createTHead().insertRow();
  for (const h of ["field", "type", "default", "rule", "meaning"]) head.append(el("th", h));
  const body = table.createTBody();
  for (const [name, raw] of Object.entries(props)) {
    const s = resolve(spec, raw);
    const row = body.insertRow();
    const cell = row.insertCell();
    cell.append(el("code", name));
    if (required.has(name)) cell.append(" (required)");
    row.insertCell().textContent = [].concat(s.type || "any").join(" | ");
    row.insertCell().textContent = s.default === undefined ? "" : JSON.stringify(s.default);
    row.insertCell().textContent = rules(s);
    row.insertCell().textContent = s.description || "";
  }
  const wrap = el("div", undefined, "scroll");
  wrap.append(table);
  if (schema.additionalProperties === false) {
    wrap.append(el("p", "Unknown fields are refused (422).", "hint"));
  }
  return wrap;
}

function operation(spec, path, method, op) {
  const id = op.operationId || `${method}-${path}`;
  const section = el("section", undefined, "op");
  section.id = id;
  section.append(el("p", (op.tags || []).join(", "), "tag"));
  const title = el("h2");
  title.append(el("span", method.toUpperCase(), "method"), path);
  section.append(title, el("p", op.summary || ""));
  const content = op.requestBody && op.requestBody.content;
  if (content) {
    const [media, body] = Object.entries(content)[0];
    section.append(el("h3", `Request body (${media})`));
    const table = fieldTable(spec, body.schema);
    if (table) section.append(table);
  }
  section.append(el("h3", "Responses"));
  const list = el("ul");
  for (const [status, r] of Object.entries(op.responses || {})) {
    const item = el("li");
    item.append(el("code", status), ` ${r.description || ""}`);
    list.append(item);
  }
  section.append(list);
  return section;
}

async function render() {
  // Bounds such as 2**63-1 do not fit a script number; where the browser gives the source text
  // of a JSON number (JSON.parse source access), keep its digits.
  const text = await (await fetch("/openapi.json")).text();
  const spec = JSON.parse(text, (key, value, context) =>
    typeof value === "number" && !Number.isSafeInteger(value) && context && context.source
      ? context.source : value);
  const routes = document.getElementById("routes");
  const toc = document.getElementById("toc");
  routes.replaceChildren();
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const section = operation(spec, path, method, op);
      routes.append(section);
      const link = el("a", `${method.toUpperCase()} ${path}`);
      link.href = `#${section.id}`;
      const item = el("li");
      item.append(link);
      toc.append(item);
    }
  }
}

document.addEventListener("DOMContentLoaded", render);
