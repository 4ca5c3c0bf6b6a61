const base = (window.__ENV__ && window.__ENV__.API_URL) || '/api/v1';
fetch(base + '/health')
  .then(r => r.json())
  .then(j => { document.getElementById('api').textContent = 'API : ' + j.service + ' ' + j.status; })
  .catch(e => { document.getElementById('api').textContent = 'API : indisponible (' + e + ')'; });
