// Renders the service's own /openapi.json with the vendored Swagger UI. Nothing is
// loaded from elsewhere: the validator badge (validator.swagger.io) is turned off.
'use strict';

window.addEventListener('DOMContentLoaded', () => {
  window.ui = window.SwaggerUIBundle({
    url: '/openapi.json',
    dom_id: '#swagger-ui',
    deepLinking: true,
    validatorUrl: null,
    presets: [window.SwaggerUIBundle.presets.apis],
    layout: 'BaseLayout',
  });
});
