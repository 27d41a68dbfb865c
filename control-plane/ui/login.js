// The log-in page: trades a token for a session cookie (POST /api/v1/session,
// JSON), then loads the dashboard. The token is never stored by the page.
'use strict';

document.getElementById('login-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const input = document.getElementById('login-token');
  const error = document.getElementById('login-error');
  error.textContent = '';
  try {
    const response = await fetch('/api/v1/session', {
      method: 'POST',
      headers: { 'content-type': 'application/json', accept: 'application/json' },
      body: JSON.stringify({ token: input.value.trim() }),
      credentials: 'same-origin',
    });
    if (response.ok) {
      input.value = '';
      window.location.replace('/');
      return;
    }
    const body = await response.json().catch(() => ({}));
    error.textContent = body.error || `log-in refused (${response.status})`;
  } catch (e) {
    error.textContent = `cannot reach the control plane: ${e}`;
  }
});
