// Swagger UI on the merged OpenAPI document, from files the gateway serves
// (a classic script: the bundle defines the global SwaggerUIBundle).
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  // never kept: the password flow's form (the password with it) and its tokens
  // (the refresh token too) would stay in localStorage, readable by any script
  // of the web client's origin and kept after its logout
  persistAuthorization: false,
  // no badge from the public validator service: the page works offline
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
