/*
 * RFC 6902 JSON Patch applier for the sidecar dashboard (no dependencies).
 *
 * Owns: applying one patch (add, remove, replace, move, copy, test) to a JSON
 * document, with RFC 6901 pointers ("~1" is "/", "~0" is "~", "-" is the end
 * of an array in "add"). Not here: the stream (dashboard.js).
 *
 * Invariants: a patch is atomic (RFC 6902 section 5): the input document is
 * never modified; the result is a new document, or an exception and nothing
 * changed. Array indexes are "0" or digits without a leading zero; anything
 * else, an index past the end, a missing member, or a "~" not followed by 0
 * or 1 is an error, as in python-json-patch, which the server uses to make
 * the patches. Members are defined, never assigned, so a key such as
 * "__proto__" is data, not a prototype.
 *
 * Known limitations: "test" compares by JSON type (RFC 6902 section 4.6), so
 * 1 and true differ here while Python's jsonpatch calls them equal; the
 * server never emits "test" operations, so streams are unaffected.
 */
(function (root) {
  "use strict";

  class PatchError extends Error {}

  const INDEX_RE = /^(0|[1-9][0-9]*)$/;

  function parsePointer(pointer) {
    if (typeof pointer !== "string") throw new PatchError("pointer must be a string");
    if (pointer === "") return [];
    if (pointer[0] !== "/") throw new PatchError("pointer must start with /: " + pointer);
    return pointer.slice(1).split("/").map(function (token) {
      if (/~[^01]|~$/.test(token)) throw new PatchError("bad escape in " + pointer);
      return token.replace(/~1/g, "/").replace(/~0/g, "~");
    });
  }

  function isObject(value) {
    return value !== null && typeof value === "object" && !Array.isArray(value);
  }

  function has(object, key) {
    return Object.prototype.hasOwnProperty.call(object, key);
  }

  function define(object, key, value) {
    Object.defineProperty(object, key, {
      value: value, writable: true, enumerable: true, configurable: true,
    });
  }

  function clone(value) {
    if (Array.isArray(value)) return value.map(clone);
    if (isObject(value)) {
      const out = {};
      for (const key of Object.keys(value)) define(out, key, clone(value[key]));
      return out;
    }
    return value;
  }

  function equal(a, b) {
    if (Array.isArray(a)) {
      if (!Array.isArray(b) || a.length !== b.length) return false;
      return a.every(function (item, i) { return equal(item, b[i]); });
    }
    if (isObject(a)) {
      if (!isObject(b)) return false;
      const keys = Object.keys(a);
      if (keys.length !== Object.keys(b).length) return false;
      return keys.every(function (key) { return has(b, key) && equal(a[key], b[key]); });
    }
    return a === b;
  }

  function arrayIndex(array, token, allowEnd) {
    if (token === "-" && allowEnd) return array.length;
    if (!INDEX_RE.test(token)) throw new PatchError("bad array index " + token);
    const index = Number(token);
    if (index > array.length || (!allowEnd && index === array.length)) {
      throw new PatchError("array index out of range: " + token);
    }
    return index;
  }

  // The container holding the pointer's last token, and that token.
  function parentOf(doc, tokens) {
    let node = doc;
    for (let i = 0; i < tokens.length - 1; i++) node = child(node, tokens[i]);
    if (!Array.isArray(node) && !isObject(node)) {
      throw new PatchError("parent is not a container");
    }
    return [node, tokens[tokens.length - 1]];
  }

  function child(node, token) {
    if (Array.isArray(node)) return node[arrayIndex(node, token, false)];
    if (isObject(node) && has(node, token)) return node[token];
    throw new PatchError("no such member: " + token);
  }

  function get(doc, tokens) {
    let node = doc;
    for (const token of tokens) node = child(node, token);
    return node;
  }

  function add(doc, tokens, value) {
    if (tokens.length === 0) return value;
    const [parent, key] = parentOf(doc, tokens);
    if (Array.isArray(parent)) parent.splice(arrayIndex(parent, key, true), 0, value);
    else define(parent, key, value);
    return doc;
  }

  function remove(doc, tokens) {
    if (tokens.length === 0) throw new PatchError("cannot remove the whole document");
    const [parent, key] = parentOf(doc, tokens);
    if (Array.isArray(parent)) {
      parent.splice(arrayIndex(parent, key, false), 1);
    } else {
      if (!has(parent, key)) throw new PatchError("no such member: " + key);
      delete parent[key];
    }
    return doc;
  }

  function replace(doc, tokens, value) {
    if (tokens.length === 0) return value;
    const [parent, key] = parentOf(doc, tokens);
    if (Array.isArray(parent)) parent[arrayIndex(parent, key, false)] = value;
    else if (has(parent, key)) define(parent, key, value);
    else throw new PatchError("no such member: " + key);
    return doc;
  }

  function isPrefix(shorter, longer) {
    if (shorter.length >= longer.length) return false;
    return shorter.every(function (token, i) { return token === longer[i]; });
  }

  function samePath(a, b) {
    return a.length === b.length && a.every(function (token, i) { return token === b[i]; });
  }

  function applyOperation(doc, op) {
    if (!isObject(op) || typeof op.op !== "string") throw new PatchError("bad operation");
    const path = parsePointer(op.path);
    switch (op.op) {
      case "add":
        if (!has(op, "value")) throw new PatchError("add needs a value");
        return add(doc, path, clone(op.value));
      case "remove":
        return remove(doc, path);
      case "replace":
        if (!has(op, "value")) throw new PatchError("replace needs a value");
        return replace(doc, path, clone(op.value));
      case "move": {
        const from = parsePointer(op.from);
        const value = get(doc, from);
        if (samePath(from, path)) return doc;
        if (isPrefix(from, path)) throw new PatchError("cannot move into a child of itself");
        return add(remove(doc, from), path, value);
      }
      case "copy":
        return add(doc, path, clone(get(doc, parsePointer(op.from))));
      case "test":
        if (!equal(get(doc, path), op.value)) throw new PatchError("test failed: " + op.path);
        return doc;
      default:
        throw new PatchError("unknown op " + op.op);
    }
  }

  function apply(doc, patch) {
    if (!Array.isArray(patch)) throw new PatchError("a patch is an array of operations");
    let result = clone(doc);
    for (const op of patch) result = applyOperation(result, op);
    return result;
  }

  root.RFC6902 = { apply: apply, parsePointer: parsePointer, PatchError: PatchError };
})(typeof window !== "undefined" ? window : globalThis);
