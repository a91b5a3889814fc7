/*
 * simsearch-wsi: SUGGEST patches similar to your prototypes, on the current image.
 *
 * Draw rectangles around a few examples of each class and classify them (the prototypes), then
 * run this script. It sends the classified rectangle annotations of the current image (the
 * selected ones, if any annotation is selected) to the simsearch-wsi server, and adds the
 * suggestions it returns as detections of each class with a "similarity" measurement. Earlier
 * suggestions of the same classes (detections with a "similarity" measurement) are replaced, so
 * record your decisions with simsearch_review.groovy before suggesting again. Detections you
 * gave the class "Rejected suggestion" are kept. With no prototype on this image, the session's
 * saved prototypes are used (the way to run a session on more images).
 *
 * Needs the server, on the machine that can read the slides:
 *     simsearch-wsi serve --allow <folder with your slides and sessions>
 * The image must be a local file (or on a mounted disk) inside an --allow folder.
 *
 * Targets QuPath 0.4, 0.5, 0.6 and 0.7 (Groovy 4, Java 17-25); also valid Groovy 2.4+.
 * QuPath API used: getCurrentServer().getURIs(), getSelectedObjects(), getAnnotationObjects(),
 * getDetectionObjects(), removeObjects(Collection, boolean), addObjects(Collection),
 * GsonTools.getInstance().toJson/fromJson, PathIO.readObjectsFromGeoJSON(InputStream) (keeps
 * the GeoJSON "id" of each object: QuPath 0.4+), PathObject.getPathClass/getROI/
 * getMeasurementList, MeasurementList.containsKey (0.4+); HTTP with java.net.http.
 * Every setting can also be given as a Java system property (-Dsimsearch.url=..., see below).
 */
import qupath.lib.io.GsonTools
import qupath.lib.io.PathIO
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
                              // Windows, e.g. 'D:/slides/exp1'; empty: suggestions are not recorded
Map THRESHOLDS = [:]          // minimum similarity per class, e.g. ['Tumor': 0.6, 'Stroma': 0.45];
                              // classes left out keep the session's threshold (0.5 at first)
int BACKGROUND = 0            // also propose the N most and N least similar unlabelled patches
String RULE = ''              // the search rule: 'object' (the objects are as big as the prototype
                              // boxes; the server's default), 'patch' (one patch per suggestion,
                              // a patch apart) or empty: the session's rule, else the server's
String CANDIDATES = ''        // where the object rule's suggestions come from: 'objects' (one per
                              // separate object found, compared at its own size), 'grid' (the
                              // best windows of a grid), 'auto' (objects where the prototypes
                              // outline separate objects, else the grid; the server's default)
                              // or empty: the session's, else the server's
int TIMEOUT_SECONDS = 900     // the first suggest on a slide embeds it (minutes on a CPU; run
                              // simsearch_embed.groovy ahead), later ones answer in about a second
// ======================================================================================
// Java system properties override the settings (the tests use them; so can headless runs):
SERVER_URL = System.getProperty('simsearch.url', SERVER_URL)
TOKEN = System.getProperty('simsearch.token', TOKEN)
SESSION = System.getProperty('simsearch.session', SESSION).trim()
THRESHOLDS = parseThresholds(System.getProperty('simsearch.thresholds'), THRESHOLDS)  // 'A=0.6,B=0.5'
BACKGROUND = Integer.parseInt(System.getProperty('simsearch.background', String.valueOf(BACKGROUND)))
RULE = System.getProperty('simsearch.rule', RULE).trim()
CANDIDATES = System.getProperty('simsearch.candidates', CANDIDATES).trim()
TIMEOUT_SECONDS = Integer.parseInt(System.getProperty('simsearch.timeout', String.valueOf(TIMEOUT_SECONDS)))

final int PROTOCOL_VERSION = 1  // the simsearch-wsi HTTP protocol this script speaks

Boolean dense = denseOf(RULE)
String candidatesRule = candidatesOf(CANDIDATES)
Map api = connect(SERVER_URL, TOKEN, PROTOCOL_VERSION)
String image = currentImageUri()
checkServer(api)

// Prototypes: classified rectangle annotations, the selected ones if any annotation is selected
// (QuPath gives collections of several kinds, the selection as a Set: copy them to lists)
List candidates = new ArrayList(getSelectedObjects() ?: []).findAll { PathObject p -> p.isAnnotation() }
String from = 'selected'
if (candidates.isEmpty()) {
    candidates = new ArrayList(getAnnotationObjects())
    from = 'all'
}
List prototypes = candidates.findAll { PathObject p -> isPrototype(p) }
if (prototypes.isEmpty() && !SESSION)
    fail('No prototypes: draw rectangle annotations around a few examples, give each a class, ' +
            'and run this script again (or set SESSION to use a session\'s saved prototypes)')

Map body = [image: image, thresholds: THRESHOLDS, background: BACKGROUND]
if (!prototypes.isEmpty())
    body.annotations = [type: 'FeatureCollection', features: toFeatures(prototypes)]
if (SESSION)
    body.session = SESSION
if (dense != null)
    body.dense = dense
if (candidatesRule != null)
    body.candidates = candidatesRule
Map answer = (Map) callServer(api, 'POST', '/suggest', body, TIMEOUT_SECONDS)
Map summary = (Map) answer.summary
Map perClass = (Map) summary.suggestions_per_class

// Replace the earlier suggestions of these classes (not the ones marked "Rejected suggestion")
Set<String> classes = new HashSet<String>()
perClass.keySet().each { classes.add(it.toString()) }
if (BACKGROUND > 0)
    classes.add('background')
List earlier = new ArrayList(getDetectionObjects()).findAll { PathObject p ->
    p.getMeasurementList().containsKey('similarity') && classes.contains(className(p))
}
if (!earlier.isEmpty())
    removeObjects(earlier, true)
List added = addFeatures((List) answer.features)

String counts = perClass.collect { k, v -> k.toString() + ' ' + ((Number) v).intValue() }.join(', ')
int nBackground = ((Number) (summary.background_candidates ?: 0)).intValue()
if (nBackground > 0)
    counts += ', background ' + nBackground
String thresholds = ((Map) summary.thresholds).collect { k, v ->
    k.toString() + '=' + String.format(Locale.ROOT, '%.2f', ((Number) v).doubleValue())
}.join(' ')
String prototypeText = prototypes.isEmpty() ? 'the session\'s prototypes' :
        prototypes.size() + ' prototype(s) (' + from + ' annotations)'
println('simsearch suggest on ' + baseName(summary.image.toString()) + ': added ' + added.size() +
        ' detections (' + counts + ') from ' + prototypeText + ', replaced ' + earlier.size() +
        ' earlier; ' + (summary.object_size_l0 ? 'object' : 'patch') + ' rule, ' +
        (summary.candidates == 'objects' ? 'object' : 'grid') + ' candidates; thresholds ' + thresholds +
        '; embed ' + summary.seconds_embed + ' s, query ' +
        summary.seconds_query + ' s; session ' + (summary.session ?: 'none'))
((List) (summary.notes ?: [])).each { println('  note: ' + it) }

// ---------------------------------- this script's helpers ----------------------------------

/** A classified rectangle annotation whose class is not one of simsearch-wsi's reserved ones. */
boolean isPrototype(PathObject p) {
    String name = className(p)
    return p.isAnnotation() && name != null && name != 'background' && name != 'Rejected suggestion' &&
            p.getROI() != null && p.getROI().getRoiName() == 'Rectangle'
}

String className(PathObject p) {
    return p.getPathClass() == null ? null : p.getPathClass().toString()
}

/** The server's "dense" field for the RULE setting: 'object' -> true, 'patch' -> false, '' -> null. */
Boolean denseOf(String rule) {
    if (rule == 'object')
        return Boolean.TRUE
    if (rule == 'patch')
        return Boolean.FALSE
    if (rule)
        fail('RULE \'' + rule + '\': use \'object\', \'patch\' or \'\' (the session\'s or the server\'s rule)')
    return null
}

/** The server's "candidates" field: 'auto', 'grid' or 'objects' as given, '' -> null. */
String candidatesOf(String candidates) {
    if (candidates in ['auto', 'grid', 'objects'])
        return candidates
    if (candidates)
        fail('CANDIDATES \'' + candidates + '\': use \'auto\', \'grid\', \'objects\' or \'\' (the session\'s or the server\'s)')
    return null
}

/** 'A=0.6,B=0.5' -> [A: 0.6, B: 0.5]; null -> the default. */
Map parseThresholds(String text, Map fallback) {
    if (text == null)
        return fallback
    Map out = [:]
    text.split(',').each { String item ->
        int eq = item.lastIndexOf('=')
        if (eq > 0)
            out.put(item.substring(0, eq).trim(), Double.parseDouble(item.substring(eq + 1).trim()))
    }
    return out
}

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

/** Adds GeoJSON features to the image as QuPath objects (keeping their ids); returns them. */
List addFeatures(List features) {
    if (features == null || features.isEmpty())
        return []
    String text = GsonTools.getInstance().toJson([type: 'FeatureCollection', features: features])
    List objects = PathIO.readObjectsFromGeoJSON(new ByteArrayInputStream(text.getBytes(StandardCharsets.UTF_8)))
    addObjects(objects)
    return objects
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
