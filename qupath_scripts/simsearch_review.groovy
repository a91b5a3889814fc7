/*
 * simsearch-wsi: RECORD YOUR REVIEW of the current image's suggestions in the session.
 *
 * After going through the suggestions in QuPath:
 *   - keep a good suggestion as it is (approved when its similarity is at or above the class
 *     threshold);
 *   - give a wrong one the class "Rejected suggestion" (a negative of the class it was suggested
 *     for; do not use QuPath's own "Negative" class, which means something else);
 *   - give it another class to relabel it; delete the ones you did not look at (unreviewed);
 *   - keep real "background" candidates, give the others "Rejected suggestion";
 *   - new classified rectangles are new prototypes.
 * Then run this script: it sends the image's annotations and its suggestion detections (those
 * with a "similarity" measurement) to the simsearch-wsi server, which records the decisions in
 * the session and answers with a report. Running it twice changes nothing; a decision that
 * contradicts an earlier one is kept and reported as a conflict.
 *
 * Needs the server, on the machine that can read the slides:
 *     simsearch-wsi serve --allow <folder with your slides and sessions>
 *
 * Targets QuPath 0.4, 0.5, 0.6 and 0.7 (Groovy 4, Java 17-25); also valid Groovy 2.4+.
 * QuPath API used: getCurrentServer().getURIs(), getAnnotationObjects(), getDetectionObjects(),
 * PathObject.getMeasurementList, MeasurementList.containsKey (0.4+),
 * GsonTools.getInstance().toJson/fromJson; HTTP with java.net.http.
 * Every setting can also be given as a Java system property (-Dsimsearch.url=..., see below).
 */
import qupath.lib.io.GsonTools
import qupath.lib.objects.PathObject

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
                              // Windows, e.g. 'D:/slides/exp1' (the one you suggested with)
int TIMEOUT_SECONDS = 120     // how long to wait for the server's answer
// ======================================================================================
// Java system properties override the settings (the tests use them; so can headless runs):
SERVER_URL = System.getProperty('simsearch.url', SERVER_URL)
TOKEN = System.getProperty('simsearch.token', TOKEN)
SESSION = System.getProperty('simsearch.session', SESSION).trim()
TIMEOUT_SECONDS = Integer.parseInt(System.getProperty('simsearch.timeout', String.valueOf(TIMEOUT_SECONDS)))

final int PROTOCOL_VERSION = 1  // the simsearch-wsi HTTP protocol this script speaks

Map api = connect(SERVER_URL, TOKEN, PROTOCOL_VERSION)
String image = currentImageUri()
if (!SESSION)
    fail('Set SESSION in the SETTINGS block to your review session folder (the one you suggested with)')
checkServer(api)

// The annotations (prototypes, new ones included) and the suggestions, however you changed them
List objects = new ArrayList(getAnnotationObjects())
objects.addAll(new ArrayList(getDetectionObjects()).findAll { PathObject p -> p.getMeasurementList().containsKey('similarity') })
Map body = [image: image, session: SESSION, annotations: [type: 'FeatureCollection', features: toFeatures(objects)]]
Map report = (Map) callServer(api, 'POST', '/review', body, TIMEOUT_SECONDS)

List<String> keys = ['approved', 'rejected', 'background', 'not_background', 'relabelled', 'below_threshold',
                     'unreviewed', 'new_prototypes', 'unchanged']
String counts = keys.collect { String k -> k.replace('_', ' ') + ' ' + ((Number) (report.get(k) ?: 0)).intValue() }.join(', ')
List conflicts = (List) (report.conflicts ?: [])
println('simsearch review of ' + baseName(report.image.toString()) + ' (' + objects.size() + ' objects sent): ' +
        counts + '; conflicts ' + conflicts.size() + '; session ' + SESSION)
conflicts.each { println('  conflict: ' + it) }

// ---------------------------------- this script's helpers ----------------------------------

String baseName(String path) {
    return path.substring(Math.max(path.lastIndexOf('/'), path.lastIndexOf('\\')) + 1)
}

/** The current image's URI as QuPath gives it, e.g. file:/C:/slides/my%20slide.svs. */
String currentImageUri() {
    def server = getCurrentServer()
    if (server == null)
        fail('No image is open: open the slide in QuPath first')
    Collection uris = server.getURIs()
    if (uris == null || uris.isEmpty())
        fail('The current image has no URI; simsearch-wsi reads images from disk: open the image from a file')
    return uris.iterator().next().toString()
}

/** PathObjects as GeoJSON Feature maps, written by QuPath itself (GsonTools). */
List toFeatures(Collection objects) {
    if (objects.isEmpty())
        return []
    def gson = GsonTools.getInstance()
    Object parsed = gson.fromJson(gson.toJson(new ArrayList(objects)), Object.class)
    if (parsed instanceof Map)  // a single Feature or a FeatureCollection
        return ((Map) parsed).type == 'FeatureCollection' ? (List) ((Map) parsed).features : [parsed]
    return (List) parsed
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
