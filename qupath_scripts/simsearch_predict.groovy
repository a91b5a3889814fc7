/*
 * simsearch-wsi: PREDICT with a trained model on the current image (a background job on the
 * server), and add what it finds to the image.
 *
 * Runs the model bundle MODEL (a .zip, as simsearch_train.groovy writes one) densely over the
 * current image on the server, which writes into OUT: <name>.geojson (the detections, with a
 * "probability <class>" measurement per class, and the segmentation as classified annotations
 * with "area_px" and "area_um2"), <name>.ome.zarr (class probabilities and the label mask),
 * <name>_overlay.png (a quick look), <name>.predict.json (what was run) and quantification.csv
 * (per class: detections, density, area, fraction of the tissue and, on brightfield, mean DAB
 * optical density). The script starts the job, prints its progress every second until it is
 * done or failed (at most MAX_WAIT_SECONDS; after that the job goes on in the server: see
 * simsearch_status.groovy), then reads <name>.geojson and adds its detections and annotations
 * to the image. Objects of an earlier prediction of the model's classes (detections with a
 * "probability <class>" measurement, annotations with "area_px") are replaced; everything else
 * (your annotations, suggestions) is kept. It prints where the other files are. Stopping the
 * script ("Kill running script") cancels the job.
 *
 * An image already predicted into OUT with the same model and settings is not run again (its
 * files are reused and imported); set FORCE = true to redo it.
 *
 * Needs the server, on the machine that can read the slides (this script reads the GeoJSON the
 * server writes, so QuPath must see the server's files at the same paths):
 *     simsearch-wsi serve --allow <folder with your slides, models and outputs>
 *
 * Targets QuPath 0.4, 0.5, 0.6 and 0.7 (Groovy 4, Java 17-25); also valid Groovy 2.4+.
 * QuPath API used: getCurrentServer().getURIs(), getAnnotationObjects(), getDetectionObjects(),
 * removeObjects(Collection, boolean), addObjects(Collection), GsonTools.getInstance().toJson/
 * fromJson, PathIO.readObjectsFromGeoJSON(InputStream) (QuPath 0.4+), PathObject.getPathClass/
 * isDetection/isAnnotation/getMeasurementList, MeasurementList.containsKey (0.4+); HTTP with
 * java.net.http.
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
import java.nio.file.Files
import java.time.Duration

// ====================================== SETTINGS ======================================
String SERVER_URL = 'http://127.0.0.1:8765'  // where `simsearch-wsi serve` listens
String TOKEN = ''             // the server's --token; empty: none (a server on 127.0.0.1 needs none)
String MODEL = ''             // the model bundle (.zip) as the server sees it, with / even on
                              // Windows, e.g. 'D:/slides/exp1/model.zip'
String OUT = ''               // output folder as the server sees it; empty: 'predictions' in
                              // the folder of MODEL
Map THRESHOLDS = [:]          // confidence threshold per class, e.g. ['Tumor': 0.6]; classes
                              // left out keep the model's (chosen on held-out patches)
double SIMPLIFY_PX = 1.0      // polygon simplification tolerance in mask pixels
double MIN_AREA_UM2 = 0       // drop segmentation pieces (and fill holes) under this area
boolean WRITE_BACK = false    // OME-Zarr images: also add the label mask to the image itself
boolean FORCE = false         // redo an image already predicted with this model and settings
int MAX_WAIT_SECONDS = 3600   // stop waiting (not the job) after this long
// ======================================================================================
// Java system properties override the settings (the tests use them; so can headless runs):
SERVER_URL = System.getProperty('simsearch.url', SERVER_URL)
TOKEN = System.getProperty('simsearch.token', TOKEN)
MODEL = System.getProperty('simsearch.model', MODEL).trim()
OUT = System.getProperty('simsearch.out', OUT).trim()
THRESHOLDS = parseThresholds(System.getProperty('simsearch.thresholds'), THRESHOLDS)  // 'A=0.6,B=0.5'
SIMPLIFY_PX = Double.parseDouble(System.getProperty('simsearch.simplifyPx', String.valueOf(SIMPLIFY_PX)))
MIN_AREA_UM2 = Double.parseDouble(System.getProperty('simsearch.minAreaUm2', String.valueOf(MIN_AREA_UM2)))
WRITE_BACK = Boolean.parseBoolean(System.getProperty('simsearch.writeBack', String.valueOf(WRITE_BACK)))
FORCE = Boolean.parseBoolean(System.getProperty('simsearch.force', String.valueOf(FORCE)))
MAX_WAIT_SECONDS = Integer.parseInt(System.getProperty('simsearch.maxWait', String.valueOf(MAX_WAIT_SECONDS)))

final int PROTOCOL_VERSION = 1  // the simsearch-wsi HTTP protocol this script speaks

Map api = connect(SERVER_URL, TOKEN, PROTOCOL_VERSION)
if (!MODEL)
    fail('Set MODEL in the SETTINGS block to the model bundle (.zip) to apply, as the server sees it ' +
            '(simsearch_train.groovy writes one)')
String image = currentImageUri()
checkServer(api)

String outFolder = OUT ?: MODEL.replaceAll('[^/\\\\]*$', '') + 'predictions'
Map body = [images: [image], model: MODEL, out: outFolder, thresholds: THRESHOLDS, simplify_px: SIMPLIFY_PX,
            min_area_um2: MIN_AREA_UM2, write_back: WRITE_BACK, force: FORCE]
Map created = (Map) callServer(api, 'POST', '/jobs/predict', body, 60)
String jobId = created.job_id.toString()
println('simsearch predict: job ' + jobId + ' started for ' + baseName(new URI(image).getPath() ?: image) +
        ' with model ' + MODEL + ' (output folder ' + outFolder + ')')
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
        fail('The prediction job failed on the server: ' + job.error)
    if (job.state == 'cancelled')
        fail('The prediction job was cancelled on the server')
    long waited = (System.currentTimeMillis() - started).intdiv(1000)
    if (waited >= MAX_WAIT_SECONDS)
        fail('The prediction job is still running after ' + waited + ' s; it goes on in the server ' +
                '(job ' + jobId + '; check with simsearch_status.groovy, then run this script again: ' +
                'it imports the finished result without predicting again)')
    try {
        Thread.sleep(1000)
    } catch (InterruptedException stopped) {
        sendRequest(api, 'DELETE', '/jobs/' + jobId, null, 10)
        fail('Stopped: asked the server to cancel prediction job ' + jobId)
    }
}
Map done = (Map) callServer(api, 'GET', '/jobs/' + jobId, null, 30)
Map result = (Map) done.result
Map predicted = (Map) ((List) result.images).get(0)
Map outputs = (Map) predicted.outputs

// Read the objects the server wrote, then replace the earlier prediction of the model's classes
File geojson = new File(outputs.geojson.toString())
if (!geojson.isFile())
    fail('The server wrote ' + geojson + ', but QuPath cannot read that file here: run QuPath on the ' +
            'server\'s machine (or mount its disks at the same paths), or drag the file onto the image')
List objects = null
InputStream stream = Files.newInputStream(geojson.toPath())
try {
    objects = PathIO.readObjectsFromGeoJSON(stream)
} finally {
    stream.close()
}
List<String> classes = ((List) result.classes).collect { it.toString() }
List earlier = (new ArrayList(getDetectionObjects()) + new ArrayList(getAnnotationObjects())).findAll { PathObject p ->
    isPredicted(p, classes)
}
if (!earlier.isEmpty())
    removeObjects(earlier, true)
addObjects(objects)

int nDetections = objects.count { PathObject p -> p.isDetection() }
int nAnnotations = objects.count { PathObject p -> p.isAnnotation() }
Map perClass = (Map) predicted.n_detections  // in the model's order (JSON objects have none)
String counts = classes.findAll { perClass.containsKey(it) }.collect { String c ->
    c + ' ' + ((Number) perClass.get(c)).intValue()
}.join(', ')
double seconds = (System.currentTimeMillis() - started) / 1000.0
String how = predicted.reused ? 'unchanged since an earlier run with this model and settings, files reused' :
        'done in ' + String.format(Locale.ROOT, '%.1f', seconds) + ' s'
println('simsearch predict on ' + baseName(predicted.image.toString()) + ': ' + how + '; added ' + nDetections +
        ' detections (' + counts + ') and ' + nAnnotations + ' segmentation annotations, replaced ' + earlier.size() +
        ' earlier')
Map thresholds = (Map) result.thresholds
println('  thresholds: ' + classes.findAll { thresholds.containsKey(it) }.collect { String c ->
    c + '=' + String.format(Locale.ROOT, '%.2f', ((Number) thresholds.get(c)).doubleValue())
}.join(' '))
println('  objects (GeoJSON): ' + outputs.geojson)
if (outputs.ome_zarr)
    println('  OME-Zarr (class probabilities and labels): ' + outputs.ome_zarr)
if (outputs.overlay)
    println('  overlay: ' + outputs.overlay)
if (outputs.labels)
    println('  labels written into the image: ' + outputs.labels)
println('  quantification.csv: ' + result.quantification)
println('  (paths on the server)')

// ---------------------------------- this script's helpers ----------------------------------

/** An object of an earlier prediction with this model's classes: a detection with the
 * model's "probability <class>" measurements, or a segmentation annotation ("area_px"). */
boolean isPredicted(PathObject p, List<String> classes) {
    if (!classes.contains(className(p)))
        return false
    if (p.isDetection())
        return classes.any { String c -> p.getMeasurementList().containsKey('probability ' + c) }
    return p.isAnnotation() && p.getMeasurementList().containsKey('area_px')
}

String className(PathObject p) {
    return p.getPathClass() == null ? null : p.getPathClass().toString()
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
