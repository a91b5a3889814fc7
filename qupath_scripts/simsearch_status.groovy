/*
 * simsearch-wsi: STATUS of the server and the session: a quick connectivity check.
 *
 * Prints whether the simsearch-wsi server answers at SERVER_URL and what it runs (protocol,
 * version, backbone, weights, device), its running jobs, the current image's URI, and the
 * session's classes, thresholds and counts when SESSION is set.
 *
 * Needs the server, on the machine that can read the slides:
 *     simsearch-wsi serve --allow <folder with your slides and sessions>
 *
 * Targets QuPath 0.4, 0.5, 0.6 and 0.7 (Groovy 4, Java 17-25); also valid Groovy 2.4+.
 * QuPath API used: getCurrentServer().getURIs(), GsonTools.getInstance().toJson/fromJson;
 * HTTP with java.net.http.
 * Every setting can also be given as a Java system property (-Dsimsearch.url=..., see below).
 */
import qupath.lib.io.GsonTools

import java.net.http.HttpClient
import java.net.http.HttpConnectTimeoutException
import java.net.http.HttpRequest
import java.net.http.HttpResponse
import java.net.http.HttpTimeoutException
import java.nio.charset.StandardCharsets
import java.time.Duration

// ====================================== SETTINGS ======================================
String SERVER_URL = 'http://127.0.0.1:8765'  // where `simsearch-wsi serve` listens
String TOKEN = ''             // the server's --token; empty: none (a server on 127.0.0.1 needs none)
String SESSION = ''           // review session folder as the server sees it, with / even on
                              // Windows, e.g. 'D:/slides/exp1'; empty: the server only
// ======================================================================================
// Java system properties override the settings (the tests use them; so can headless runs):
SERVER_URL = System.getProperty('simsearch.url', SERVER_URL)
TOKEN = System.getProperty('simsearch.token', TOKEN)
SESSION = System.getProperty('simsearch.session', SESSION).trim()

final int PROTOCOL_VERSION = 1  // the simsearch-wsi HTTP protocol this script speaks

Map api = connect(SERVER_URL, TOKEN, PROTOCOL_VERSION)
Map health = checkServer(api)
println('simsearch-wsi server at ' + api.url + ': ' + health.status + ', protocol ' +
        ((Number) health.protocol).intValue() + ', simsearch_wsi ' + health.version)
println('  backbone ' + health.backbone + '; weights: ' + health.weights + '; device ' + health.device +
        '; token required: ' + (health.auth_required ? 'yes' : 'no'))
if (health.auth_required && !api.token)
    println('  note: this server needs its token: set TOKEN in the SETTINGS block')

def imageServer = getCurrentServer()
Collection uris = imageServer == null ? [] : (imageServer.getURIs() ?: [])
println('current image: ' + (uris.isEmpty() ? 'none (open a slide to use the other scripts)' : uris.iterator().next().toString()))

Map jobsAnswer = sendRequest(api, 'GET', '/jobs', null, 10)
if (jobsAnswer.status == 200 && jobsAnswer.json instanceof Map) {
    List active = ((List) ((Map) jobsAnswer.json).jobs).findAll { Map j -> j.state == 'running' || j.state == 'queued' }
    println('jobs: ' + active.size() + ' running or queued')
    active.each { Map j -> println('  ' + j.kind + ' ' + j.id + ': ' + j.state + ', ' + ((Map) j.progress).stage) }
} else {
    println('jobs: ' + errorMessage(api, 'GET', '/jobs', jobsAnswer))
}

if (!SESSION) {
    println('session: none set (SESSION is empty)')
} else {
    String route = '/session?dir=' + URLEncoder.encode(SESSION, 'UTF-8')
    Map answer = sendRequest(api, 'GET', route, null, 30)
    if (answer.status != 200 || !(answer.json instanceof Map)) {
        println('session ' + SESSION + ': ' + errorMessage(api, 'GET', '/session', answer))
    } else {
        Map s = (Map) answer.json
        Map classes = (Map) (s.classes ?: [:])
        List patch = (List) s.patch_size_l0
        String patchText = patch == null ? 'not fixed yet' : ((Number) patch[0]).intValue() + 'x' + ((Number) patch[1]).intValue() + ' px'
        println('session ' + s.session + ': ' + classes.size() + ' classes, patch ' + patchText + ', ' +
                ((Number) s.suggestions_sent).intValue() + ' suggestions sent, reviews ' + ((Number) s.reviews).intValue() +
                '; reviewed images ' + ((List) s.reviewed_images).size() + ' of ' + ((List) s.images).size())
        classes.each { name, c ->
            Map m = (Map) c
            println('  ' + name + ': threshold ' + String.format(Locale.ROOT, '%.2f', ((Number) m.threshold).doubleValue()) +
                    ', prototypes ' + ((Number) m.prototypes).intValue() + ', positives ' + ((Number) m.positives).intValue() +
                    ', negatives ' + ((Number) m.negatives).intValue())
        }
        println('  background: ' + ((Number) s.background).intValue() + ' confirmed, ' +
                ((Number) s.not_background).intValue() + ' rejected')
    }
}

// ------------- HTTP helpers: the same block in every simsearch_*.groovy script -------------

Map connect(String url, String token, int protocol) {
    String base = url == null ? '' : url.trim().replaceAll('/+$', '')
    if (!(base ==~ /(?i)https?:\/\/[^\s\/]+(\/\S*)?/))
        fail('SERVER_URL "' + url + '" is not an http:// address such as http://127.0.0.1:8765')
    HttpClient client = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(5))
            .version(HttpClient.Version.HTTP_1_1).build()
    return [url: base, token: token == null ? '' : token.trim(), protocol: protocol, client: client]
}

/** One request; [status, json (parsed, or null), text]. Stops when the server cannot be reached. */
Map sendRequest(Map api, String method, String route, Object body, int timeoutSeconds) {
    HttpRequest.Builder request = HttpRequest.newBuilder(URI.create(api.url + '/api/v1' + route))
            .timeout(Duration.ofSeconds(timeoutSeconds))
            .header('Accept', 'application/json')
            .header('X-SimSearch-Protocol', String.valueOf(api.protocol))
    if (api.token)
        request.header('Authorization', 'Bearer ' + api.token)
    if (body == null) {
        request.method(method, HttpRequest.BodyPublishers.noBody())
    } else {
        String json = GsonTools.getInstance().toJson(body)
        request.header('Content-Type', 'application/json')
        request.method(method, HttpRequest.BodyPublishers.ofString(json, StandardCharsets.UTF_8))
    }
    HttpResponse<String> response = null
    try {
        response = ((HttpClient) api.client).send(request.build(), HttpResponse.BodyHandlers.ofString(StandardCharsets.UTF_8))
    } catch (HttpConnectTimeoutException e) {
        fail(notRunning(api))
    } catch (HttpTimeoutException e) {
        fail('The simsearch-wsi server at ' + api.url + ' did not answer ' + method + ' ' + route + ' within ' +
                timeoutSeconds + ' s; it may still be working (embed large slides first with simsearch_embed.groovy)')
    } catch (IOException e) {
        for (Throwable t = e; t != null; t = t.getCause())
            if (t instanceof ConnectException)
                fail(notRunning(api))
        fail('Could not talk to the simsearch-wsi server at ' + api.url + ': ' + e)
    }
    String text = response.body() == null ? '' : response.body()
    Object json = null
    try {
        json = text.trim() ? GsonTools.getInstance().fromJson(text, Object.class) : null
    } catch (Exception notJson) {
        json = null
    }
    return [status: response.statusCode(), json: json, text: text]
}

/** One request; the parsed JSON answer. Stops with the server's message on an error. */
Object callServer(Map api, String method, String route, Object body, int timeoutSeconds) {
    Map answer = sendRequest(api, method, route, body, timeoutSeconds)
    int status = (int) answer.status
    if (status >= 200 && status < 300 && answer.json != null)
        return answer.json
    fail(errorMessage(api, method, route, answer))
    return null
}

/** GET /health; stops unless a simsearch-wsi server speaking this script's protocol answers. */
Map checkServer(Map api) {
    Map answer = sendRequest(api, 'GET', '/health', null, 10)
    Object json = answer.json
    Object protocol = json instanceof Map ? ((Map) json).protocol : null
    if (answer.status == 200 && protocol instanceof Number && ((Number) protocol).intValue() == api.protocol)
        return (Map) json
    boolean ours = json instanceof Map && (protocol instanceof Number || ((Map) json).error instanceof Map)
    if (!ours || !(answer.status in [200, 404, 409]))
        fail(errorMessage(api, 'GET', '/health', answer))
    String theirs = protocol instanceof Number ? 'protocol ' + ((Number) protocol).intValue() : 'another protocol'
    if (((Map) json).version)
        theirs += ' (simsearch_wsi ' + ((Map) json).version + ')'
    String said = ((Map) json).error instanceof Map ? ' The server says: ' + ((Map) ((Map) json).error).message : ''
    fail('Protocol mismatch: this QuPath script speaks simsearch-wsi protocol ' + api.protocol +
            ', the server at ' + api.url + ' speaks ' + theirs + '. Update the QuPath scripts (use the ' +
            'qupath_scripts folder of the installed simsearch_wsi) or the simsearch_wsi package so that ' +
            'they match.' + said)
    return null
}

String errorMessage(Map api, String method, String route, Map answer) {
    Object json = answer.json
    Object error = json instanceof Map ? ((Map) json).error : null
    if (error instanceof Map)
        return 'simsearch-wsi server error (HTTP ' + answer.status + ' on ' + method + ' /api/v1' + route + '): ' +
                ((Map) error).message
    String text = answer.text.toString().replaceAll('\\s+', ' ').trim()
    return 'The server at ' + api.url + ' answered ' + method + ' /api/v1' + route + ' with HTTP ' + answer.status +
            ', not as simsearch-wsi does (is another program using that address?): ' + text.take(200)
}

String notRunning(Map api) {
    return 'The simsearch-wsi server is not running at ' + api.url + '; start it with ' +
            '`simsearch-wsi serve --allow <folder>` (the folder that holds your slides and sessions)'
}

/** Shows the message (a dialog in QuPath's window, the log when headless) and stops the script. */
void fail(String message) {
    showError('simsearch-wsi', message)
    throw new RuntimeException(message)
}

/** An error dialog when QuPath's GUI runs (0.5+: qupath.fx.dialogs, 0.4: qupath.lib.gui.dialogs); always printed. */
void showError(String title, String message) {
    println('ERROR: ' + message)
    ClassLoader loader = this.getClass().getClassLoader()
    try {
        if (Class.forName('qupath.lib.gui.QuPathGUI', true, loader).getMethod('getInstance').invoke(null) == null)
            return
    } catch (Throwable headless) {
        return
    }
    for (String name : ['qupath.fx.dialogs.Dialogs', 'qupath.lib.gui.dialogs.Dialogs']) {
        try {
            Class.forName(name, true, loader).getMethod('showErrorMessage', String.class, String.class)
                    .invoke(null, title, message)
            return
        } catch (Throwable tryNext) {
        }
    }
}
