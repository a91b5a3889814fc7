/*
 * simsearch-wsi: QUANTIFY IHC positive cells in the selected annotations (or in every annotation,
 * or in the whole image when there is none), as QuPath's positive cell detection reports them.
 *
 * Sends the regions to the server (a background job), which finds the nuclei on the hematoxylin
 * channel (colour deconvolution with QuPath's default H-DAB vectors, or vectors estimated on the
 * image), grows them into cells, measures DAB optical density per compartment and classifies each
 * cell against THRESHOLDS (QuPath's defaults 0.2 / 0.4 / 0.6 on "Nucleus: DAB OD mean"). The cells
 * come back as QuPath cell objects (classes Positive/Negative, or 1+/2+/3+/Negative with
 * THREE_CLASSES, and measurements named as QuPath names them: "Nucleus: DAB OD mean", "Cell: DAB
 * OD max", ...). Each scored annotation gets the measurements "Num Detections", "Num Negative",
 * "Num Positive", "Positive %", "Num 1+", "Num 2+", "Num 3+", "H-score", "Area µm^2", "Num
 * Detections per mm^2" and "Num Positive per mm^2"; without annotations, one annotation over the
 * whole image is added carrying them. Cells of an earlier run inside the regions are replaced;
 * everything else is kept. The script prints the scores per region. Stopping the script ("Kill
 * running script") cancels the job.
 *
 * Needs the server, on the machine that can read the slides:
 *     simsearch-wsi serve --allow <folder with your slides>
 *
 * Targets QuPath 0.4, 0.5, 0.6 and 0.7 (Groovy 4, Java 17-25); also valid Groovy 2.4+.
 * QuPath API used: getCurrentServer().getURIs(), getSelectedObjects(), getAnnotationObjects(),
 * getDetectionObjects(), removeObjects(Collection, boolean), addObjects(Collection),
 * GsonTools.getInstance().toJson/fromJson, PathIO.readObjectsFromGeoJSON(InputStream) (QuPath
 * 0.4+), PathObject.getID/isAnnotation/isDetection/getPathClass/getMeasurementList/getROI,
 * ROI.contains(x, y), ROI.getCentroidX/Y, MeasurementList.put/containsKey (0.4+),
 * fireHierarchyUpdate(); HTTP with java.net.http.
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
List THRESHOLDS = [0.2, 0.4, 0.6]  // 1+, 2+, 3+ thresholds (QuPath's defaults); 1+ = positive
boolean THREE_CLASSES = false // classes 1+/2+/3+/Negative instead of Positive/Negative
String COMPARTMENT = 'Nucleus: DAB OD mean'  // or 'Cell: DAB OD mean', 'Cytoplasm: DAB OD mean', ...
double CELL_EXPANSION_UM = 5.0  // cell = nucleus grown by this many micrometres
String STAINS = 'default'     // 'default' (QuPath's H-DAB vectors) or 'estimate' (on this image)
double MPP = 0                // level-0 um/px when the image file has none (PNG, JPEG); 0: the file's
int MAX_WAIT_SECONDS = 3600   // stop waiting (not the job) after this long
// ======================================================================================
// Java system properties override the settings (the tests use them; so can headless runs):
SERVER_URL = System.getProperty('simsearch.url', SERVER_URL)
TOKEN = System.getProperty('simsearch.token', TOKEN)
THRESHOLDS = parseNumbers(System.getProperty('simsearch.ihcThresholds'), THRESHOLDS)  // '0.2,0.4,0.6'
THREE_CLASSES = Boolean.parseBoolean(System.getProperty('simsearch.threeClasses', String.valueOf(THREE_CLASSES)))
COMPARTMENT = System.getProperty('simsearch.compartment', COMPARTMENT)
CELL_EXPANSION_UM = Double.parseDouble(System.getProperty('simsearch.cellExpansionUm', String.valueOf(CELL_EXPANSION_UM)))
STAINS = System.getProperty('simsearch.stains', STAINS)
MPP = Double.parseDouble(System.getProperty('simsearch.mpp', String.valueOf(MPP)))
MAX_WAIT_SECONDS = Integer.parseInt(System.getProperty('simsearch.maxWait', String.valueOf(MAX_WAIT_SECONDS)))

final int PROTOCOL_VERSION = 1  // the simsearch-wsi HTTP protocol this script speaks

Map api = connect(SERVER_URL, TOKEN, PROTOCOL_VERSION)
if (THRESHOLDS.size() != 3)
    fail('Set THRESHOLDS to three non-decreasing numbers (1+, 2+, 3+), e.g. [0.2, 0.4, 0.6]')
String image = currentImageUri()
checkServer(api)

List regions = new ArrayList(getSelectedObjects() ?: []).findAll { PathObject p -> p.isAnnotation() }
if (regions.isEmpty())
    regions = new ArrayList(getAnnotationObjects())
Map body = [image: image, annotations: regions.isEmpty() ? null : [type: 'FeatureCollection', features: toFeatures(regions)],
            thresholds: THRESHOLDS, three_classes: THREE_CLASSES, compartment: COMPARTMENT,
            cell_expansion_um: CELL_EXPANSION_UM, stains: STAINS]
if (MPP > 0)
    body.mpp = MPP
Map created = (Map) callServer(api, 'POST', '/jobs/quantify', body, 60)
String jobId = created.job_id.toString()
println('simsearch quantify: job ' + jobId + ' started for ' + baseName(new URI(image).getPath() ?: image) + ' on ' +
        (regions.isEmpty() ? 'the whole image' : regions.size() + ' annotation(s)'))
long started = System.currentTimeMillis()
String last = ''
while (true) {
    Map job = (Map) callServer(api, 'GET', '/jobs/' + jobId, null, 30)
    Map progress = (Map) (job.progress ?: [:])
    int total = ((Number) (progress.total ?: 0)).intValue()
    String line = job.state.toString() + ': ' + progress.stage +
            (total > 0 ? ' (' + ((Number) progress.done).intValue() + '/' + total + ')' : '')
    if (line != last)
        println('  ' + line)
    last = line
    if (job.state == 'done')
        break
    if (job.state == 'failed')
        fail('The quantification job failed on the server: ' + job.error)
    if (job.state == 'cancelled')
        fail('The quantification job was cancelled on the server')
    long waited = (System.currentTimeMillis() - started).intdiv(1000)
    if (waited >= MAX_WAIT_SECONDS)
        fail('The quantification job is still running after ' + waited + ' s; it goes on in the server ' +
                '(job ' + jobId + '; check with simsearch_status.groovy)')
    try {
        Thread.sleep(1000)
    } catch (InterruptedException stopped) {
        sendRequest(api, 'DELETE', '/jobs/' + jobId, null, 10)
        fail('Stopped: asked the server to cancel quantification job ' + jobId)
    }
}
Map result = (Map) ((Map) callServer(api, 'GET', '/jobs/' + jobId, null, 60)).result
List features = (List) ((Map) result.features).features
List cellFeatures = features.findAll { Map f -> ((Map) f.properties).objectType != 'annotation' }
List regionFeatures = features.findAll { Map f -> ((Map) f.properties).objectType == 'annotation' }

// Cells of an earlier run inside the regions are replaced
List earlier = new ArrayList(getDetectionObjects()).findAll { PathObject p ->
    isScoredCell(p) && (regions.isEmpty() || regions.any { PathObject r -> r.getROI().contains(p.getROI().getCentroidX(), p.getROI().getCentroidY()) })
}
if (!earlier.isEmpty())
    removeObjects(earlier, true)
addFeatures(cellFeatures)

// The scores go onto the annotations they belong to (same id); a whole-image region is added
Map byId = [:]
regions.each { PathObject r -> byId.put(r.getID().toString(), r) }
List added = []
regionFeatures.each { Map f ->
    PathObject target = (PathObject) byId.get(f.id.toString())
    Map measurements = (Map) (((Map) f.properties).measurements ?: [:])
    if (target == null) {
        added.addAll(addFeatures([f]))
    } else {
        measurements.each { k, v -> target.getMeasurementList().put(k.toString(), ((Number) v).doubleValue()) }
    }
}
fireHierarchyUpdate()  // the measurement table shows the new annotation measurements
double seconds = (System.currentTimeMillis() - started) / 1000.0
println('simsearch quantify on ' + baseName(result.image.toString()) + ': ' + ((Number) result.n_cells).intValue() +
        ' cells in ' + String.format(Locale.ROOT, '%.1f', seconds) + ' s, replaced ' + earlier.size() + ' earlier')
((List) result.scores).each { Map s ->
    String pct = s.positive_pct == null ? '-' : String.format(Locale.ROOT, '%.1f %%', ((Number) s.positive_pct).doubleValue())
    String h = s.h_score == null ? '-' : String.format(Locale.ROOT, '%.0f', ((Number) s.h_score).doubleValue())
    println('  ' + s.region + ': ' + ((Number) s.n_cells).intValue() + ' cells, positive ' + pct + ', H-score ' + h)
}

// ---------------------------------- this script's helpers ----------------------------------

/** A cell of an earlier run: a detection classified by intensity, with the DAB measurement. */
boolean isScoredCell(PathObject p) {
    String c = p.getPathClass() == null ? null : p.getPathClass().toString()
    return c in ['Positive', 'Negative', '1+', '2+', '3+'] && p.getMeasurementList().containsKey('Nucleus: DAB OD mean')
}

/** '0.2,0.4,0.6' -> [0.2, 0.4, 0.6]; null -> the default. */
List parseNumbers(String text, List fallback) {
    if (text == null)
        return fallback
    return text.split(',').collect { String t -> Double.parseDouble(t.trim()) }
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
