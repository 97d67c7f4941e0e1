// The catalog: search and filters, pages by cursor, a product page, and the
// administrator's create and edit forms (edits carry If-Match; a 412 shows
// the current version and offers to re-apply the user's changes to it).

import { ApiError, request } from "../api.js";
import { fill, formatDateTime, h } from "../dom.js";
import { busy, clearErrors, field, formError, showErrors } from "../forms.js";

const PAGE_SIZE = 12;
const SORTS = [
  ["created_at", "Oldest first"],
  ["-created_at", "Newest first"],
  ["name", "Name, A to Z"],
  ["-name", "Name, Z to A"],
  ["price", "Price, low to high"],
  ["-price", "Price, high to low"],
];

let categoriesOnce = null;
function categories() {
  categoriesOnce ??= request("/catalog/categories")
    .then(({ body }) => body)
    .catch((error) => {
      categoriesOnce = null;
      throw error;
    });
  return categoriesOnce;
}

function categorySelect(name, selected, { anyLabel }) {
  const select = h(
    "select",
    { id: `field-${name}`, name, "aria-describedby": `field-${name}-error` },
    h("option", { value: "" }, anyLabel),
  );
  categories()
    .then((list) => {
      for (const category of list) {
        select.append(h("option", { value: category.slug }, category.name));
      }
      select.value = selected ?? "";
    })
    .catch(() => {});
  return select;
}

const splitTags = (text) =>
  String(text ?? "")
    .split(",")
    .map((tag) => tag.trim())
    .filter(Boolean);

export function catalogView({ session, navigate, query }) {
  const filters = h(
    "form",
    { role: "search", class: "filters", novalidate: true, "aria-label": "Search the catalog" },
    formError(),
    field({ label: "Search", name: "q", type: "search", value: query.get("q") ?? "" }),
    field({
      label: "Tags",
      name: "tag",
      hint: "Comma-separated; products with all of them.",
      value: query.getAll("tag").join(", "),
    }),
    h(
      "div",
      { class: "field" },
      h("label", { for: "field-category" }, "Category"),
      categorySelect("category", query.get("category"), { anyLabel: "Any category" }),
      h("p", { class: "field-error", id: "field-category-error", hidden: true }),
    ),
    field({
      label: "Lowest price",
      name: "min_price",
      type: "number",
      min: "0",
      step: "0.01",
      inputmode: "decimal",
      value: query.get("min_price") ?? "",
    }),
    field({
      label: "Highest price",
      name: "max_price",
      type: "number",
      min: "0",
      step: "0.01",
      inputmode: "decimal",
      value: query.get("max_price") ?? "",
    }),
    h(
      "div",
      { class: "field" },
      h("label", { for: "field-sort" }, "Sort by"),
      h(
        "select",
        { id: "field-sort", name: "sort" },
        SORTS.map(([value, label]) =>
          h("option", { value, selected: value === (query.get("sort") ?? "-created_at") }, label),
        ),
      ),
    ),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Search")),
  );
  filters.addEventListener("submit", (event) => {
    event.preventDefault();
    const values = new FormData(filters);
    const params = new URLSearchParams();
    for (const [name, value] of values) {
      if (name === "tag") splitTags(value).forEach((tag) => params.append("tag", tag));
      else if (String(value).trim()) params.set(name, String(value).trim());
    }
    navigate(`/?${params}`);
  });

  const list = h("ul", { class: "products", "aria-label": "Products" });
  const summary = h("p", { class: "summary", role: "status" });
  const more = h("button", { type: "button", class: "secondary", hidden: true }, "Load more");
  let cursor = null;
  let shown = 0;

  async function loadPage() {
    const params = new URLSearchParams(query);
    params.set("limit", String(PAGE_SIZE));
    if (!params.has("sort")) params.set("sort", "-created_at");
    if (cursor) params.set("cursor", cursor);
    more.disabled = true;
    try {
      const { body } = await request(`/catalog/products?${params}`);
      clearErrors(filters);
      for (const product of body.items) list.append(productCard(product));
      shown += body.items.length;
      cursor = body.next_cursor;
      more.hidden = cursor === null;
      summary.textContent =
        shown === 0
          ? "No products match."
          : `Showing ${shown} product${shown === 1 ? "" : "s"}${cursor ? "" : ", all there are"}.`;
    } catch (error) {
      summary.textContent = "";
      showErrors(filters, error);
    } finally {
      more.disabled = false;
    }
  }
  more.addEventListener("click", loadPage);
  loadPage();

  return h(
    "section",
    {},
    h(
      "div",
      { class: "heading" },
      h("h1", { tabindex: "-1" }, "Catalog"),
      session.isAdmin ? h("a", { href: "/products/new", class: "button" }, "New product") : null,
    ),
    filters,
    summary,
    list,
    more,
  );
}

function productCard(product) {
  return h(
    "li",
    { class: "product", dataset: { id: product.id } },
    h("a", { href: `/products/${product.id}` }, product.name),
    h("span", { class: "price" }, product.price),
    tagList(product.tags),
  );
}

function tagList(tags) {
  return tags.length === 0
    ? null
    : h("ul", { class: "tags", "aria-label": "Tags" }, tags.map((tag) => h("li", {}, tag)));
}

function productFields(values = {}) {
  return [
    field({ label: "Name", name: "name", required: true, value: values.name ?? "" }),
    field({
      label: "Price",
      name: "price",
      required: true,
      inputmode: "decimal",
      hint: "Above 0, at most two decimals; at most 100 when tagged “sale”.",
      value: values.price ?? "",
    }),
    field({
      label: "Tags",
      name: "tags",
      hint: "Comma-separated.",
      value: (values.tags ?? []).join(", "),
    }),
    h(
      "div",
      { class: "field" },
      h("label", { for: "field-category" }, "Category"),
      categorySelect("category", values.category?.slug, { anyLabel: "No category" }),
      h("p", { class: "field-error", id: "field-category-error", hidden: true }),
    ),
  ];
}

function readProductForm(form) {
  const values = Object.fromEntries(new FormData(form));
  return {
    name: values.name.trim(),
    price: values.price.trim(),
    tags: splitTags(values.tags),
    category: values.category || null,
  };
}

export function newProductView({ session, navigate }) {
  if (!session.isAdmin) {
    return h(
      "section",
      { class: "narrow" },
      h("h1", { tabindex: "-1" }, "New product"),
      h("p", {}, "Only administrators add products."),
    );
  }
  // one key per product being entered: a retry after a lost answer creates it once
  let idempotencyKey = crypto.randomUUID();
  const form = h(
    "form",
    { novalidate: true },
    formError(),
    productFields(),
    h("button", { type: "submit" }, "Create product"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const product = readProductForm(form);
    if (!product.category) delete product.category;
    await busy(form, async () => {
      try {
        const { body } = await session.call("/catalog/products", {
          method: "POST",
          json: product,
          headers: { "Idempotency-Key": idempotencyKey },
        });
        idempotencyKey = crypto.randomUUID();
        navigate(`/products/${body.id}`);
      } catch (error) {
        showErrors(form, error, { 409: "name" });
      }
    });
  });
  return h("section", { class: "narrow" }, h("h1", { tabindex: "-1" }, "New product"), form);
}

export function productView({ session, params }) {
  const section = h("section", {}, h("h1", { tabindex: "-1" }, "Product"), h("p", {}, "Loading…"));
  load();
  return section;

  async function load() {
    try {
      const { body, headers } = await request(`/catalog/products/${encodeURIComponent(params[0])}`);
      render(body, headers.get("ETag"));
    } catch (error) {
      const missing = error instanceof ApiError && (error.status === 404 || error.status === 422);
      fill(
        section,
        h("h1", { tabindex: "-1" }, missing ? "No such product" : "The product could not be loaded"),
        h("p", {}, missing ? "It may have been deleted. " : `${error.message} `, backLink()),
      );
    }
  }

  function render(product, etag) {
    const details = h("dl", { class: "details" });
    const title = h("h1", { tabindex: "-1" }, product.name);
    const showDetails = (shown) => {
      title.textContent = shown.name;
      document.title = `${shown.name} · Bazaar`;
      fill(details, ...describe(shown));
    };
    showDetails(product);
    fill(
      section,
      backLink(),
      title,
      details,
      session.isAdmin ? editor(product, etag, showDetails) : null,
    );
  }

  function editor(product, etag, showDetails) {
    let base = product; // the version the form started from
    let currentEtag = etag;
    const status = h("p", { role: "status", class: "success" });
    const conflict = h("div", { class: "conflict", role: "alert", hidden: true });
    const form = h(
      "form",
      { novalidate: true, "aria-labelledby": "edit-heading" },
      h("h2", { id: "edit-heading" }, "Edit"),
      formError(),
      productFields(product),
      h("button", { type: "submit" }, "Save changes"),
    );

    const changesFrom = (version) => {
      const wanted = readProductForm(form);
      const changes = {};
      if (wanted.name !== version.name) changes.name = wanted.name;
      if (wanted.price !== version.price) changes.price = wanted.price;
      if (wanted.tags.join(",") !== version.tags.join(",")) changes.tags = wanted.tags;
      if (wanted.category !== (version.category?.slug ?? null)) changes.category = wanted.category;
      return changes;
    };

    const save = async (changes) => {
      try {
        const { body, headers } = await session.call(`/catalog/products/${base.id}`, {
          method: "PATCH",
          json: changes,
          headers: { "If-Match": currentEtag },
        });
        base = body;
        currentEtag = headers.get("ETag");
        conflict.hidden = true;
        clearErrors(form);
        showDetails(body);
        status.textContent = `Saved: version ${body.version}.`;
      } catch (error) {
        if (error instanceof ApiError && error.status === 412) {
          await showConflict(changes);
        } else {
          showErrors(form, error, { 409: "name" });
        }
      }
    };

    const showConflict = async (changes) => {
      const { body: current, headers } = await request(`/catalog/products/${base.id}`);
      const reapply = h("button", { type: "button" }, `Re-apply my changes to version ${current.version}`);
      const discard = h("button", { type: "button", class: "secondary" }, "Discard my changes");
      reapply.addEventListener("click", () =>
        busy(form, async () => {
          base = current;
          currentEtag = headers.get("ETag");
          await save(changes);
        }),
      );
      discard.addEventListener("click", () => {
        wrapper.replaceWith(editor(current, headers.get("ETag"), showDetails));
      });
      status.textContent = "";
      showDetails(current);
      fill(
        conflict,
        h("h3", {}, "Someone else changed this product"),
        h(
          "p",
          {},
          `It is now at version ${current.version} (shown above). Your changes were not saved: `,
          Object.entries(changes)
            .map(([name, value]) => `${name} → ${Array.isArray(value) ? value.join(", ") : value ?? "none"}`)
            .join("; "),
          ".",
        ),
        h("div", { class: "actions" }, reapply, discard),
      );
      conflict.hidden = false;
      reapply.focus();
    };

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      clearErrors(form);
      const changes = changesFrom(base);
      if (Object.keys(changes).length === 0) {
        status.textContent = "Nothing to save: no field changed.";
        return;
      }
      await busy(form, () => save(changes));
    });
    const wrapper = h("div", { class: "editor" }, conflict, form, status);
    return wrapper;
  }
}

function describe(product) {
  return [
    h("dt", {}, "Price"),
    h("dd", { dataset: { field: "price" } }, product.price),
    h("dt", {}, "With tax"),
    h("dd", {}, product.price_with_tax),
    h("dt", {}, "Tags"),
    h("dd", { dataset: { field: "tags" } }, product.tags.join(", ") || "none"),
    h("dt", {}, "Category"),
    h("dd", {}, product.category?.name ?? "none"),
    h("dt", {}, "Version"),
    h("dd", { dataset: { field: "version" } }, String(product.version)),
    h("dt", {}, "Updated"),
    h("dd", {}, formatDateTime(product.updated_at)),
  ];
}

function backLink() {
  return h("a", { href: "/", class: "back" }, "← Back to the catalog");
}
